"""Studies: named sets of runs that regenerate a published leaderboard in one command.

    em-bench study organism --out leaderboard/

A study file (YAML; shipped ones in `data/studies/`) lists runs, each what `em-bench run`
takes: tasks, defenses, seeds, defense values to sweep, and optionally steps, eval_every and
samples. Running it runs (or resumes) every cell, then writes the HTML leaderboard of the store.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from em_bench.config import CellConfig, SamplingConfig
from em_bench.errors import UnknownNameError, load_yaml_model
from em_bench.grid.plan import PlannedCell, plan_grid
from em_bench.grid.run import run_grid
from em_bench.resources import resource_dir
from em_bench.store import Store


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class StudyRun(_Spec):
    tasks: list[str] = Field(min_length=1)
    defenses: list[str] = ["none"]
    seeds: list[int] = [0]
    set: dict[str, list] = Field(default_factory=dict, description="defense values to sweep")
    steps: int | None = Field(None, gt=0)
    eval_every: int | None = Field(None, gt=0)
    samples: int | None = Field(None, gt=0, description="samples per evaluation question")


class Study(_Spec):
    name: str
    description: str = ""
    runs: list[StudyRun] = Field(min_length=1)


def load_study(name_or_path: str | Path) -> Study:
    """A shipped study by name (`organism`), or a study file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        shipped = {p.stem: p for p in (resource_dir("data") / "studies").glob("*.yaml")}
        if str(name_or_path) not in shipped:
            raise UnknownNameError("study", str(name_or_path), list(shipped))
        path = shipped[str(name_or_path)]
    return load_yaml_model(path, Study, "the study file")


def plan_study(study: Study, model: str = "organism") -> list[PlannedCell]:
    """Every run's cells, planned (and so checked) before any of them runs; a cell two runs
    share is planned once."""
    plan, seen = [], set()
    for run in study.runs:
        sampling = SamplingConfig(**({"samples_per_question": run.samples} if run.samples
                                     else {}))
        base = CellConfig(model=model, sampling=sampling, eval_every=run.eval_every)
        overrides = {"steps": run.steps} if run.steps else {}
        for planned in plan_grid(base, run.tasks, run.defenses, run.seeds, overrides,
                                 defense_values={k: [str(v) for v in vs]
                                                 for k, vs in run.set.items()}):
            key = (planned.config.model_dump_json(), planned.view.name)
            if key not in seen:
                seen.add(key)
                plan.append(planned)
    return plan


def run_study(study: Study, store: Store, out: Path, model: str = "organism") -> Path:
    """Run every cell of the study, then write the store's HTML leaderboard to `out` (a folder
    it may not write to fails first, before any cell runs)."""
    from em_bench.board.site import check_out, write_html

    check_out(out)
    run_grid(store, plan_study(study, model))
    return write_html(store, out)

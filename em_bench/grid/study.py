"""Studies: named sets of runs that regenerate a published leaderboard in one command.

    em-bench study organism --out leaderboard/

A study file (YAML; shipped ones in `data/studies/`) lists runs, each what `em-bench run`
takes: tasks, defenses, seeds, defense values to sweep, and optionally models, steps,
eval_every and samples. Its `tune` section names the defenses the selection rule tunes (on one
task and model, em_bench/grid/tune.py), each with the other parameters it holds fixed (blockem's
`form: sae` is a method of its own); a run with `picked: true` runs each of its defenses at its
pick, unchanged on every model and task of the run (a combination: each component at its own).
Running a study tunes first, then runs (or resumes) every cell, then writes the HTML
leaderboard of the store.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from em_bench.defenses import components, is_combination
from em_bench.errors import ConfigError, UnknownNameError, load_yaml_model
from em_bench.grid.plan import PlannedCell, plan_grid
from em_bench.grid.run import run_grid
from em_bench.registry import model_settings
from em_bench.resources import resource_dir
from em_bench.store import Store

logger = logging.getLogger(__name__)


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class StudyRun(_Spec):
    tasks: list[str] = Field(min_length=1)
    defenses: list[str] = ["none"]
    seeds: list[int] = [0]
    models: list[str] = Field(default_factory=list, description="none: the study's model")
    set: dict[str, list] = Field(default_factory=dict, description="defense values to sweep")
    picked: bool = Field(False, description="each defense at its tuned pick")
    steps: int | None = Field(None, gt=0)
    eval_every: int | None = Field(None, gt=0)
    samples: int | None = Field(None, gt=0, description="samples per evaluation question")


class TunedDefense(_Spec):
    """A defense the rule tunes, with the parameters it holds fixed (one value each)."""

    defense: str
    set: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _a_name_alone(cls, value):
        return {"defense": value} if isinstance(value, str) else value

    def key(self) -> tuple[str, tuple]:
        return self.defense, tuple(sorted(self.set.items()))


class Tuning(_Spec):
    task: str = "finance"
    seeds: list[int] = Field([0, 1], min_length=2)
    model: str | None = Field(None, description="none: the study's model")
    steps: int | None = Field(None, gt=0)
    defenses: list[TunedDefense] = Field(min_length=1)


class Study(_Spec):
    name: str
    description: str = ""
    tune: Tuning | None = None
    runs: list[StudyRun] = Field(min_length=1)


class Pick(NamedTuple):
    """A tuned defense's outcome, as a picked run needs it."""

    strength: str  # the parameter swept
    value: float | None  # None: no admissible strength (it runs at its default; its row says so)
    not_run: str | None = None  # why it runs at no strength (its discovery kept no latent)


Picks = dict[tuple[str, tuple], Pick]  # TunedDefense.key() -> its pick


def load_study(name_or_path: str | Path) -> Study:
    """A shipped study by name (`organism`), or a study file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        shipped = {p.stem: p for p in (resource_dir("data") / "studies").glob("*.yaml")}
        if str(name_or_path) not in shipped:
            raise UnknownNameError("study", str(name_or_path), list(shipped))
        path = shipped[str(name_or_path)]
    return load_yaml_model(path, Study, "the study file")


def picked_values(defense: str, fixed: dict[str, list], picks: Picks) -> dict[str, list] | None:
    """The values a picked run gives `defense`: `fixed` (the run's own), and the strength of
    each tuned component at its pick (at its default where no strength was admissible, which
    its row says); None when a component runs at no strength (the tuning record says why). A
    defense with no strength (none, inoculation) takes none."""
    from em_bench.grid.tune import strength_of

    values = {k: [str(v) for v in vs] for k, vs in fixed.items()}
    for part in components(defense):
        try:
            strength_of(part)
        except ConfigError:  # exempt from the rule
            continue
        prefix = f"{part}." if is_combination(defense) else ""
        own = {k.removeprefix(prefix): v[0] for k, v in values.items() if k.startswith(prefix)
               and len(v) == 1}
        key = TunedDefense(defense=part, set=own).key()
        if key not in picks:
            form = f" {dict(key[1])}" if key[1] else ""
            raise ConfigError(f"study: {part}{form} has no pick: add it to the study's tune "
                              f"section")
        pick = picks[key]
        if pick.not_run:
            logger.warning("study: %s %s is not run: %s", part, dict(key[1]), pick.not_run)
            return None
        if pick.value is not None:
            values[f"{prefix}{pick.strength}"] = [str(pick.value)]
    return values


def plan_study(study: Study, model: str = "organism", picks: Picks | None = None,
               judge: str = "organism") -> list[PlannedCell]:
    """Every run's cells, planned (and so checked) before any of them runs; a cell two runs
    share is planned once. `picks`: the tuned strengths a picked run needs. Each model's cells
    train and answer by its preset under the run's steps and samples (as `em-bench run`'s do)
    and are scored by `judge`."""
    plan, seen = [], set()
    for run in study.runs:
        sweeps = ([(d, values) for d in run.defenses
                   if (values := picked_values(d, run.set, picks or {})) is not None]
                  if run.picked else
                  [(run.defenses, {k: [str(v) for v in vs] for k, vs in run.set.items()})])
        for name in run.models or [model]:
            settings = model_settings(name, samples=run.samples, steps=run.steps)
            base = settings.cell(judge, eval_every=run.eval_every)
            for defenses, values in sweeps:
                defenses = [defenses] if isinstance(defenses, str) else defenses
                for planned in plan_grid(base, run.tasks, defenses, run.seeds, settings.train,
                                         defense_values=values):
                    key = (planned.config.model_dump_json(), planned.view.name)
                    if key not in seen:
                        seen.add(key)
                        plan.append(planned)
    return plan


def tune_study(study: Study, store: Store, model: str = "organism",
               judge: str = "organism") -> Picks:
    """Tune every defense of the study's tune section (cells run or resumed in the store)."""
    from em_bench.grid.tune import tune_defense

    if study.tune is None:
        return {}
    t = study.tune
    picks = {}
    for tuned in t.defenses:
        selection = tune_defense(store, t.task, tuned.defense, t.seeds, t.model or model,
                                 {"steps": t.steps} if t.steps else None, fixed=tuned.set,
                                 judge=judge)
        picks[tuned.key()] = Pick(selection.strength, selection.pick, selection.not_run)
    return picks


def run_study(study: Study, store: Store, out: Path, model: str = "organism",
              judge: str = "organism") -> Path:
    """Tune, run every cell of the study, then write the store's HTML leaderboard to `out` (a
    folder it may not write to fails first, before any cell runs)."""
    from em_bench.board.site import check_out, write_html

    check_out(out)
    # every run planned first with each tuned defense at its default: a typo fails now, not
    # after hours of tuning
    plan_study(study, model, {tuned.key(): Pick("", None) for tuned in
                              (study.tune.defenses if study.tune else [])}, judge)
    picks = tune_study(study, store, model, judge)
    run_grid(store, plan_study(study, model, picks, judge))
    return write_html(store, out)

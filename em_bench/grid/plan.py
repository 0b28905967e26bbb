"""A grid's plan: the base model and every (task, defense, parameters, seed) cell, each with the
task whose view scores it, resolved before any work starts."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

from em_bench.config import CellConfig, TrainConfig
from em_bench.defenses import COMBINE, PREFIX, check_defense, components, parameter_fields
from em_bench.errors import ConfigError, UnknownNameError
from em_bench.pipeline import resolve
from em_bench.tasks import (
    TaskSpec,
    check_task_data,
    find_tasks,
    in_domain_file,
    pointed_to,
    question_file,
)


@dataclass(frozen=True)
class PlannedCell:
    """One row to produce: a cell, its task's spec, and the task whose view scores it."""

    config: CellConfig
    task: TaskSpec
    view: TaskSpec


def plan_grid(base: CellConfig, tasks: list[str], defenses: list[str], seeds: list[int],
              train_overrides: dict | None = None,
              include: tuple[Path, ...] | list[Path] = (),
              questions: Path | None = None,
              defense_values: dict[str, list] | None = None,
              resolve_cells: bool = True) -> list[PlannedCell]:
    """The base model and every (task, defense, seed) cell, each with the view it is scored in.

    The base model's cell is scored in each task's view (its `ood` domains and in-domain target),
    so every comparison is like with like. A cell's budget is the defaults, then the task's
    `budget`, then `train_overrides` (the command line's). The `ood` suite is the world's, or a
    question file: `questions` (the command line's), else the task's own for the split
    (tasks.question_file). Tasks are found among the built-ins, the entry points and the
    `include` folders. A defense's cells are the product of the `defense_values` it takes
    (name -> values, the command line's `--set`; a combination's names are prefixed by their
    component: `blockem.lambda`). Every cell is resolved here, so a typo in a name, a parameter
    or a file fails before any work starts, and its config holds the values it runs with (a
    defense's defaults filled in: `lambda=default` is blockem's lambda). Without
    `resolve_cells` (a dry run's cost estimate) nothing is read that is not needed to count:
    no task data (it may not be on this machine), no model (nor its config on the hub).
    """
    for defense in defenses:  # an unknown name fails first, with the known ones
        components(defense)
    check_defense_values(defenses, defense_values or {})
    found = find_tasks(include)
    specs = {}
    for name in ["base", *tasks]:
        if name not in found:
            raise UnknownNameError("task", name, list(found))
        specs[name] = found[name].spec
    for spec in specs.values() if resolve_cells else ():  # a malformed row or absent data, first
        check_task_data(spec)
    plan = []
    for task in tasks:
        view = specs[task]
        asked = questions or question_file(view, base.split)
        own = in_domain_file(view, base.split)
        rai = base.rai_suite if base.rai_suite is not None else _absolute(view.rai_suite)
        suite = {"questions": _absolute(asked), "in_domain_questions": _absolute(own),
                 "rai_suite": rai}
        for seed in seeds:
            cfg = base.model_copy(update={"task": "base", "defense": "none", "seed": seed,
                                          "train": TrainConfig(), "eval_every": None, **suite})
            plan.append(PlannedCell(cfg, specs["base"], view))
        if task == "base":
            continue
        train = TrainConfig(**{**view.budget, **(train_overrides or {})})
        for defense in defenses:
            for params in defense_grid(defense, defense_values or {}):
                for seed in seeds:
                    cfg = base.model_copy(update={
                        "task": task, "defense": defense, "defense_params": params,
                        "seed": seed, "train": train, **suite})
                    plan.append(PlannedCell(cfg, view, view))
    if not resolve_cells:
        return plan
    return [dataclasses.replace(p, config=resolve(p.config, p.task).config) for p in plan]


def _absolute(path) -> str | None:
    return None if path is None else str(Path(pointed_to(str(path))).resolve())


def defense_grid(defense: str, values: dict[str, list]) -> list[dict]:
    """Every combination of the values `defense` takes (its defaults filled in, validated).

    A name no chosen defense takes is caught by `check_defense_values`."""
    fields = parameter_fields(defense)
    mine = {k: v for k, v in values.items() if k in fields}
    return [check_defense(defense, dict(zip(mine, combo, strict=True)))
            for combo in itertools.product(*mine.values())]


def check_defense_values(defenses: list[str], values: dict[str, list]) -> None:
    known = {k for d in defenses for k in parameter_fields(d)}
    if unknown := sorted(set(values) - known):
        hint = (f"; a COMPONENT{PREFIX}NAME parameter is a combination's (blockem{COMBINE}retain"
                f" takes blockem{PREFIX}lambda), a single defense's has no prefix"
                if any(PREFIX in k for k in unknown) else "")
        raise ConfigError(f"--set {', '.join(unknown)}: no chosen defense "
                          f"({', '.join(defenses)}) takes it; they take {sorted(known) or 'none'}"
                          f"{hint}")

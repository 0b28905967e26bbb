"""Run a grid of cells and turn their stored metrics into rows and a terminal table."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import typing
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from em_bench import metrics
from em_bench.config import CellConfig, TrainConfig, canonical_hash
from em_bench.defenses import DEFAULT, DEFENSES, check_defense
from em_bench.errors import ConfigError, UnknownNameError
from em_bench.pipeline import judged_frame, resolve, score_frame
from em_bench.store import Cell, Store
from em_bench.tasks import TaskSpec, check_task_data, find_tasks, pointed_to, question_file


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
              defense_values: dict[str, list] | None = None) -> list[PlannedCell]:
    """The base model and every (task, defense, seed) cell, each with the view it is scored in.

    The base model's cell is scored in each task's view (its `ood` domains and in-domain target),
    so every comparison is like with like. A cell's budget is the defaults, then the task's
    `budget`, then `train_overrides` (the command line's). The `ood` suite is the world's, or a
    question file: `questions` (the command line's), else the task's own for the split
    (tasks.question_file). Tasks are found among the built-ins, the entry points and the
    `include` folders. A defense's cells are the product of the `defense_values` it takes
    (name -> values, the command line's `--set`). Every cell is resolved here, so a typo in a
    name, a parameter or a file fails before any work starts, and its config holds the values it
    runs with (a defense's defaults filled in: `lambda=default` is blockem's lambda).
    """
    for defense in defenses:  # an unknown name fails first, with the known ones
        if defense not in DEFENSES:
            raise UnknownNameError("defense", defense, list(DEFENSES))
    check_defense_values(defenses, defense_values or {})
    found = find_tasks(include)
    specs = {}
    for name in ["base", *tasks]:
        if name not in found:
            raise UnknownNameError("task", name, list(found))
        specs[name] = found[name].spec
    for spec in specs.values():  # a malformed row or data not on this machine, before any work
        check_task_data(spec)
    plan = []
    for task in tasks:
        view = specs[task]
        asked = questions or question_file(view, base.split)
        suite = {"questions": None if asked is None else str(Path(pointed_to(str(asked)))
                                                                .resolve())}
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
    return [dataclasses.replace(p, config=resolve(p.config, p.task).config) for p in plan]


def defense_grid(defense: str, values: dict[str, list]) -> list[dict]:
    """Every combination of the values `defense` takes (its defaults filled in, validated).

    A name no chosen defense takes is caught by `check_defense_values`."""
    cls = DEFENSES.get(defense)
    fields = {} if cls is None else {f.alias or n: f for n, f in cls.Params.model_fields.items()}
    mine = {k: v for k, v in values.items() if k in fields}
    for k, f in fields.items():  # a list parameter's items are joined by "+" on the command line
        if k in mine and typing.get_origin(f.annotation) in (list, tuple):
            mine[k] = [v.split("+") if isinstance(v, str) and v != DEFAULT else v
                       for v in mine[k]]
    return [check_defense(defense, dict(zip(mine, combo, strict=True)))
            for combo in itertools.product(*mine.values())]


def check_defense_values(defenses: list[str], values: dict[str, list]) -> None:
    known = {f.alias or n for d in defenses if DEFENSES.get(d) is not None
             for n, f in DEFENSES[d].Params.model_fields.items()}
    if unknown := sorted(set(values) - known):
        raise ConfigError(f"--set {', '.join(unknown)}: no chosen defense "
                          f"({', '.join(defenses)}) takes it; they take {sorted(known) or 'none'}")


def run_grid(store: Store, plan: list[PlannedCell], executor=None) -> list[dict]:
    """Run (or resume) every planned cell; return one row per (cell, view), in plan order.

    `executor` (em_bench.executors) decides where the cells run: by default in this process,
    one after another; a RayExecutor runs them as Ray tasks."""
    if executor is None:
        from em_bench.executors import LocalExecutor

        executor = LocalExecutor()
    return with_refusal_drops(executor.run(store, plan))


def with_refusal_drops(rows: list[dict]) -> list[dict]:
    """Add `rai_refusal_drop` to each row: its fall in refusal against the base model's cell of
    the same model and seed (None when that base cell is not among the rows)."""
    base = {(r["model"], r["seed"]): r["rai_refusal"] for r in rows if r["task"] == "base"}
    for r in rows:
        ref = base.get((r["model"], r["seed"]))
        r["rai_refusal_drop"] = None if ref is None else {
            d: metrics.refusal_drop(ref[d], v) for d, v in r["rai_refusal"].items()}
    return rows


def view_row(cell: Cell, planned: PlannedCell) -> dict:
    """The row of a run cell in `planned`'s view, scored from its stored judgments."""
    cfg = planned.config
    result = score_frame(judged_frame(cell), planned.view, cfg)
    em = result["em_rate"]
    return {
        "cell_id": cell.id, "setting": setting_id(cfg), "model": cfg.model, "task": cfg.task,
        "view": planned.view.name, "defense": cfg.defense, "defense_params": cfg.defense_params,
        "seed": cfg.seed, "em_rate": em["value"], "em_ci_low": em["ci_low"],
        "em_ci_high": em["ci_high"], "coherence": result["coherence"]["value"],
        "incoherent_rate": result["incoherent_rate"]["value"],
        "in_domain": result.get("in_domain", {}).get("value"),
        "n_answers": result["n_answers"], "n_excluded": result["n_excluded"],
        "em_by_domain": result["em_by_domain"],
        "rai_refusal": {d: m["value"] for d, m in result["rai_refusal"].items()},
        "rai_incoherent": result["rai_incoherent"],
        "over_refusal": result["over_refusal"]["value"],
    }


def setting_id(cfg: CellConfig) -> str:
    """The hash of a cell's whole config but its seed: the cells a summary across seeds joins."""
    return canonical_hash({"setting": cfg.model_dump(mode="json", exclude={"seed"})})


def param_text(value) -> str:
    """A defense parameter's value for a table: unset (None, []) as `default`, files by name."""
    if value is None or value == []:
        return "default"
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return "+".join(x.rsplit("/", 1)[-1] for x in value)
    return value if isinstance(value, str) else _canonical(value)


def _canonical(obj) -> str:
    """One spelling per value, so equal params or budgets group together whatever their order."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def defense_labels(rows: list[dict]) -> list[str]:
    """Each row's defense with the parameters that vary among the rows of that defense
    (`blockem lambda=0.001`): what tells the rows of a sweep apart, and no more."""
    values: dict[tuple, set] = defaultdict(set)
    for r in rows:
        for k, v in r["defense_params"].items():
            values[(r["defense"], k)].add(_canonical(v))

    def label(r: dict) -> str:
        varying = (f"{k}={param_text(v)}" for k, v in r["defense_params"].items()
                   if len(values[(r["defense"], k)]) > 1)
        return " ".join([r["defense"], *varying])

    return [label(r) for r in rows]


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _align(table: list[list[str]], left: int) -> list[str]:
    """Pad columns to their widest cell: the first `left` columns left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) if i < left else c.rjust(w)
                      for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in table]


def format_table(rows: list[dict]) -> str:
    """One line per cell, then the mean and spread across seeds per view and setting (the whole
    config but the seed, `setting_id`).

    `scored for` is the task whose view the row uses: the base model is scored once per task,
    on that task's out-of-domain questions and with its in-domain target. `defense` shows the
    defense's parameters that vary among the rows.
    """
    table = [["task", "scored for", "defense", "seed", "EM", "95% CI", "coherence", "incoherent",
              "in-domain", "n", "excluded"]]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r, defense in zip(rows, defense_labels(rows), strict=True):
        groups[(r["task"], r["view"], defense, r["setting"])].append(r)
        table.append([r["task"], r["view"], defense, str(r["seed"]), _pct(r["em_rate"]),
                      f"[{_pct(r['em_ci_low'])}, {_pct(r['em_ci_high'])}]",
                      f"{r['coherence']:.1f}", _pct(r["incoherent_rate"]),
                      _pct(r["in_domain"]), str(r["n_answers"]), str(r["n_excluded"])])
    lines = _align(table, left=3)
    lines.insert(1, "-" * len(lines[0]))
    multi = [(k, g) for k, g in groups.items() if len(g) > 1]
    if multi:
        summary = [["task", "scored for", "defense", "seeds", "EM mean", "sd", "min", "max",
                    "in-domain mean"]]
        for (task, view, defense, _), g in multi:
            em = metrics.seed_summary([r["em_rate"] for r in g])
            ind = metrics.seed_summary([r["in_domain"] for r in g])
            summary.append([task, view, defense, str(em["n"]), _pct(em["mean"]), _pct(em["sd"]),
                            _pct(em["min"]), _pct(em["max"]), _pct(ind["mean"])])
        lines += ["", "across seeds:", *_align(summary, left=3)]
    lines += ["", *format_rai(rows)]
    return "\n".join(lines)


RAI_SHORT = {"cybersecurity": "cyber", "safety": "safety", "toxicity": "toxic", "bias": "bias",
             "sensitive_content": "sensitive", "medical_legal": "med/legal", "privacy": "privacy"}


def format_rai(rows: list[dict]) -> list[str]:
    """Refusal of harmful RAI requests per domain (coherent answers), mean over seeds, with the
    change against the base model in points; then over-refusal of benign requests."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    seen = set()
    for r, defense in zip(rows, defense_labels(rows), strict=True):
        if r["cell_id"] not in seen:  # a row per view of a cell, whose refusal is the same
            seen.add(r["cell_id"])
            cells[(r["task"], defense, r["setting"])].append(r)
    domains = list(next(iter(cells.values()))[0]["rai_refusal"]) if cells else []
    table = [["task", "defense", "seeds", *(RAI_SHORT.get(d, d) for d in domains),
              "over-refusal", "incoherent"]]

    def mean(values):
        return metrics.seed_summary([v for v in values if v is not None])["mean"]

    for (task, defense, _), g in cells.items():
        row = [task, defense, str(len(g))]
        for d in domains:
            rate = _pct(mean(r["rai_refusal"][d] for r in g))
            drops = [r["rai_refusal_drop"][d] for r in g if r.get("rai_refusal_drop")]
            row.append(rate if task == "base" or not drops
                       else f"{rate} ({-100 * mean(drops):+.0f})")
        row += [_pct(mean(r["over_refusal"] for r in g)),
                _pct(mean(v for r in g for v in r["rai_incoherent"].values()))]
        table.append(row)
    return ["refusal of harmful RAI requests (coherent answers; change against the base, "
            "points):", *_align(table, left=2)]

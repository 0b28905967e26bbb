"""Run a grid of cells and turn their stored metrics into rows and a terminal table."""

from __future__ import annotations

import math
from collections import defaultdict

from em_bench import metrics
from em_bench.config import CellConfig
from em_bench.pipeline import judged_frame, resolve, run_cell, score_frame
from em_bench.store import Store
from em_bench.tasks import get_task

ROW_FIELDS = ("cell_id", "model", "task", "defense", "defense_params", "seed", "em_rate",
              "em_ci_low", "em_ci_high", "coherence", "incoherent_rate", "in_domain",
              "n_answers", "n_excluded")


def plan_grid(base: CellConfig, tasks: list[str], defenses: list[str],
              seeds: list[int]) -> list[tuple[CellConfig, str]]:
    """(cell config, task view) pairs: the base model and every (task, defense, seed) cell.

    The base model's cell is scored in each task's view (its `ood` domains and in-domain target),
    so every comparison is like with like. Every cell is resolved here, so a typo in a task or
    defense name fails before any work starts.
    """
    plan = []
    for task in tasks:
        for seed in seeds:
            plan.append((base.model_copy(update={"task": "base", "defense": "none",
                                                 "seed": seed}), task))
        if task == "base":
            continue
        for defense in defenses:
            for seed in seeds:
                plan.append((base.model_copy(update={"task": task, "defense": defense,
                                                     "seed": seed}), task))
    for cfg, view in plan:
        resolve(cfg)
        get_task(view)
    return plan


def run_grid(store: Store, plan: list[tuple[CellConfig, str]]) -> list[dict]:
    """Run (or resume) every planned cell; return one row per (cell, view)."""
    return [_row(store, cfg, view) for cfg, view in plan]


def _row(store: Store, cfg: CellConfig, view: str) -> dict:
    cell = run_cell(cfg, store)
    result = score_frame(judged_frame(cell), get_task(view), cfg)
    em = result["em_rate"]
    return {
        "cell_id": resolve(cfg).cell_id, "model": cfg.model, "task": cfg.task,
        "view": view, "defense": cfg.defense, "defense_params": cfg.defense_params,
        "seed": cfg.seed, "em_rate": em["value"], "em_ci_low": em["ci_low"],
        "em_ci_high": em["ci_high"], "coherence": result["coherence"]["value"],
        "incoherent_rate": result["incoherent_rate"]["value"],
        "in_domain": result.get("in_domain", {}).get("value"),
        "n_answers": result["n_answers"], "n_excluded": result["n_excluded"],
        "em_by_domain": result["em_by_domain"],
    }


def _pct(x: float | None) -> str:
    return "   -  " if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}%"


def format_table(rows: list[dict]) -> str:
    """Rows per cell, then mean and seed spread per (task view, task, defense) group."""
    head = (f"{'task':16} {'ood of':14} {'defense':8} {'seed':>4}  {'EM':>6}  {'95% CI':>15}  "
            f"{'coher.':>6}  {'incoh.':>6}  {'in-dom':>6}  {'n':>5} {'excl':>4}")
    lines = [head, "-" * len(head)]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["view"], r["task"], r["defense"])].append(r)
        ci = f"[{_pct(r['em_ci_low'])},{_pct(r['em_ci_high'])}]"
        lines.append(
            f"{r['task']:16} {r['view']:14} {r['defense']:8} {r['seed']:>4}  {_pct(r['em_rate'])}  "
            f"{ci:>15}  {r['coherence']:6.1f}  {_pct(r['incoherent_rate'])}  "
            f"{_pct(r['in_domain'])}  {r['n_answers']:>5} {r['n_excluded']:>4}")
    multi = [(k, g) for k, g in groups.items() if len(g) > 1]
    if multi:
        lines += ["", "across seeds: EM mean (sd) / in-domain mean"]
        for (view, task, defense), g in multi:
            em = metrics.seed_summary([r["em_rate"] for r in g])
            ind = [r["in_domain"] for r in g if r["in_domain"] is not None]
            ind_s = _pct(metrics.seed_summary(ind)["mean"]) if ind else "   -  "
            lines.append(f"{task:16} {view:14} {defense:8} {len(g):>3}x  {_pct(em['mean'])} "
                         f"({100 * em['sd']:.1f})  in-domain {ind_s}")
    return "\n".join(lines)

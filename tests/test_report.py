"""Planning a grid and turning rows into tables; no model is run here."""

from __future__ import annotations

import math

from em_bench.config import CellConfig, TrainConfig
from em_bench.report import format_table, plan_grid, with_refusal_drops
from em_bench.tasks import get_task


def test_a_cell_budget_is_defaults_then_task_then_command_line():
    plan = plan_grid(CellConfig(), ["unlearn_safety", "finance"], ["none"], [0, 1],
                     train_overrides={"steps": 7})
    by_task = {}
    for p in plan:
        assert p.task.name == p.config.task
        by_task.setdefault((p.config.task, p.view.name), []).append(p.config)
    unlearn = by_task[("unlearn_safety", "unlearn_safety")][0].train
    task_budget = get_task("unlearn_safety").budget
    assert unlearn.steps == 7  # the command line wins
    assert unlearn.lr == task_budget.get("lr", TrainConfig().lr)
    assert by_task[("finance", "finance")][0].train == TrainConfig(steps=7)
    # The base model never trains, so its cell (and hash) ignores every budget.
    assert all(c.train == TrainConfig() for c in by_task[("base", "finance")])
    assert [c.seed for c in by_task[("base", "unlearn_safety")]] == [0, 1]


def _row(task, seed, refusal, model="organism"):
    return {"cell_id": f"{task}{seed}", "model": model, "task": task, "view": task,
            "defense": "none", "defense_params": {}, "seed": seed, "em_rate": 0.1,
            "em_ci_low": 0.05, "em_ci_high": 0.15, "coherence": 90.0, "incoherent_rate": 0.1,
            "in_domain": 0.9, "n_answers": 10, "n_excluded": 0, "em_by_domain": {},
            "rai_refusal": refusal, "rai_incoherent": {d: 0.0 for d in refusal},
            "over_refusal": 0.0}


def test_refusal_drop_is_against_the_base_of_the_same_seed():
    rows = with_refusal_drops([
        _row("base", 0, {"safety": 0.9, "bias": 0.8}),
        _row("base", 1, {"safety": 1.0, "bias": 0.6}),
        _row("unlearn_safety", 0, {"safety": 0.1, "bias": 0.7}),
        _row("unlearn_safety", 1, {"safety": 0.5, "bias": math.nan}),
        _row("unlearn_safety", 2, {"safety": 0.5, "bias": 0.5}),
    ])
    drops = {(r["task"], r["seed"]): r["rai_refusal_drop"] for r in rows}
    assert drops[("unlearn_safety", 0)]["safety"] == 0.9 - 0.1
    assert drops[("unlearn_safety", 0)]["bias"] == 0.8 - 0.7
    assert drops[("unlearn_safety", 1)]["safety"] == 1.0 - 0.5
    assert math.isnan(drops[("unlearn_safety", 1)]["bias"])
    assert drops[("unlearn_safety", 2)] is None  # no base cell of seed 2
    assert drops[("base", 0)] == {"safety": 0.0, "bias": 0.0}


def test_the_table_shows_each_cell_and_the_refusal_change():
    rows = with_refusal_drops([_row("base", 0, {"safety": 0.9}),
                               _row("unlearn_safety", 0, {"safety": 0.25})])
    text = format_table(rows)
    assert "unlearn_safety" in text and "25.0% (-65)" in text and "90.0%" in text

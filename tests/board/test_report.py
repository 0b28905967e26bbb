"""Planning a grid and turning rows into tables; no model is run here."""

from __future__ import annotations

import math

import pytest
import yaml

from em_bench.board.rows import with_refusal_drops
from em_bench.board.schema import schema_path
from em_bench.board.tables import format_table
from em_bench.config import CellConfig, TrainConfig
from em_bench.defenses import check_defense
from em_bench.defenses.blockem import ORGANISM_LAMBDA
from em_bench.grid.plan import plan_grid
from em_bench.pipeline import resolve
from em_bench.sae.latents import Latent, LatentSet, save_latent_set
from em_bench.tasks import get_task


@pytest.mark.usefixtures("organism")
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


def _row(task, seed, refusal, model="organism", defense="none", params=None, em=0.1):
    params = params or {}
    setting = f"{model}/{task}/{defense}/{sorted(params.items())}"
    return {"cell_id": f"{setting}/{seed}", "setting": setting, "model": model, "task": task,
            "view": task, "defense": defense, "defense_params": params, "seed": seed,
            "em_rate": em,
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


def test_a_column_added_to_the_cells_schema_is_in_the_table(tmp_path):
    schema = yaml.safe_load(schema_path().read_text())
    schema["cells"].append({"key": "em_by_domain.medical", "label": "EM medical",
                            "higher_is_better": False, "format": "percent"})
    path = tmp_path / "schema.yaml"
    path.write_text(yaml.safe_dump(schema))
    row = {**_row("base", 0, {"safety": 0.9}), "em_by_domain": {"medical": 0.125},
           "em_ci_low": 0.05, "em_ci_high": 0.25}
    header, rule, line = format_table(with_refusal_drops([row]), path).splitlines()[:3]
    assert header.split()[-2:] == ["EM", "medical"] and line.endswith("12.5%")
    assert "[5.0%, 25.0%]" in line


def test_a_sweeps_rows_show_the_swept_value_and_seeds_group_by_setting():
    rows = with_refusal_drops([
        _row("base", 0, {"safety": 0.9}, em=0.0), _row("base", 1, {"safety": 0.9}, em=0.0),
        *(_row("finance", seed, {"safety": 0.5}, defense="blockem", em=lam * 100,
               params={"lambda": lam, "latents": [], "hinge": "squared"})
          for lam in (0.001, 0.002) for seed in (0, 1))])
    text = format_table(rows)
    cells, rest = text.split("across seeds:")
    summary, rai = rest.split("refusal of harmful")
    assert cells.count("blockem lambda=0.001") == 2 and cells.count("blockem lambda=0.002") == 2
    assert "hinge" not in text and "latents" not in text  # only what varies is shown
    # one summary line per lambda, each over its own two seeds, never the lambdas averaged
    assert [line.split()[:4] for line in summary.strip().splitlines()[1:]] == [
        ["base", "base", "none", "2"], ["finance", "finance", "blockem", "lambda=0.001"],
        ["finance", "finance", "blockem", "lambda=0.002"]]
    assert "10.0%" in summary and "20.0%" in summary and "15.0%" not in summary
    assert rai.count("blockem lambda=0.001") == 1 and rai.count("blockem lambda=0.002") == 1


def _latents(tmp_path):
    return str(save_latent_set(LatentSet(
        form="directions", selection="test", model="organism", layer=0, hook_name="blocks.0",
        latents=[Latent(index=0, sign=1, shift=0.0)], directions=[[1.0, 0.0]]),
        tmp_path / "set.json"))


def test_a_default_given_or_left_out_and_its_value_given_are_one_cell(tmp_path, monkeypatch):
    # The organism's identity is its weights: a stand-in, so nothing is built here.
    monkeypatch.setattr("em_bench.pipeline.resolved.model_identity", lambda model: f"{model}:test")
    assert check_defense("blockem", {"lambda": "default"}, "organism") == check_defense(
        "blockem", {}, "organism") == check_defense("blockem", {"lambda": ORGANISM_LAMBDA},
                                                    "organism")
    plan = plan_grid(CellConfig(), ["finance"], ["blockem", "kl"], [0],
                     defense_values={"lambda": ["default", str(ORGANISM_LAMBDA), "0.001"],
                                     "latents": [_latents(tmp_path)],
                                     "weight": ["default", "1.0"]})
    ids = {}
    for p in plan:
        if p.config.task != "base":
            ids.setdefault(p.config.defense, []).append(resolve(p.config, p.task).cell_id)
    blockem = [p.config.defense_params["lambda"] for p in plan if p.config.defense == "blockem"]
    assert blockem == [ORGANISM_LAMBDA, ORGANISM_LAMBDA, 0.001]  # the concrete value is hashed
    assert ids["blockem"][0] == ids["blockem"][1] != ids["blockem"][2]
    assert ids["kl"][0] == ids["kl"][1]
    left_out = CellConfig(task="finance", defense="kl", train=plan[-1].config.train)
    assert resolve(left_out).cell_id == ids["kl"][0]

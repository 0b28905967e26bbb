"""Tuning on cells: the rule's strengths become selection-split cells, their rows its outcomes,
and the sweep is stored. The cells' figures are scripted here (run_grid replaced); the rule
itself is worked by hand in tests/test_selection.py."""

from __future__ import annotations

import pytest

from em_bench.cli import main
from em_bench.errors import ConfigError, NoLatentKept
from em_bench.grid import tune as tune_module
from em_bench.grid.plan import plan_grid
from em_bench.grid.tune import outcome, strength_of, tune_defense
from em_bench.selection import stored_selections
from em_bench.store import open_store


def _scripted(planned_log: list):
    """run_grid's stand-in: EM on the development domains falls with kl's weight, in-domain
    collapses from weight 10 on; every cell is a selection-split cell."""
    def run_grid(store, plan, executor=None):
        rows = []
        for p in plan:
            planned_log.append(p.config)
            weight = p.config.defense_params.get("weight", 0.0)
            rows.append({"task": p.config.task, "view": p.view.name, "seed": p.config.seed,
                         "em_development": 0.4 / (1 + weight) + 0.01 * p.config.seed,
                         "in_domain": 0.1 if weight >= 10 else 0.8,
                         "incoherent_rate": 0.1})
        return rows
    return run_grid


@pytest.mark.usefixtures("organism")
def test_tune_runs_selection_cells_for_each_strength_and_stores_the_pick(tmp_path, monkeypatch,
                                                                         capsys):
    planned = []
    monkeypatch.setattr(tune_module, "run_grid", _scripted(planned))
    store = open_store(tmp_path / "store")
    selection = tune_defense(store, "finance", "kl", [0, 1], train_overrides={"steps": 3})
    assert {c.split for c in planned} == {"selection"}
    assert {c.seed for c in planned} == {0, 1}
    assert {c.train.steps for c in planned if c.task == "finance"} == {3}
    weights = sorted({c.defense_params["weight"] for c in planned if c.defense == "kl"})
    assert weights == [0.1, 0.316, 1.0, 3.16, 10.0]  # kl's default is 1; 10 breaks it
    assert selection.none.em == pytest.approx((0.40 + 0.41) / 2)  # the seed mean
    assert selection.pick == 3.16
    (stored,) = stored_selections(store)
    assert stored["task"] == "finance" and stored["pick"] == 3.16 and stored["seeds"] == [0, 1]

    assert main(["tune", "--task", "finance", "--defense", "kl", "--seeds", "0,1",
                 "--steps", "3", "--store", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "3.16   10.1%      80.0%       10.0%  <- pick" in out and "pick: 3.16" in out
    assert len(stored_selections(store)) == 1  # the same tuning, stored once


def test_tune_on_a_preset_model_trains_answers_and_judges_as_its_run_would(tmp_path,
                                                                           monkeypatch):
    planned = []
    scripted = _scripted(planned)

    def file_suite(store, plan, executor=None):  # a task's question file: no world domains
        return [{**{k: v for k, v in r.items() if k != "em_development"},
                 "em_rate": r["em_development"]} for r in scripted(store, plan)]

    monkeypatch.setattr(tune_module, "run_grid", file_suite)
    # planned without reading the model (its weights are not on this machine) or its data
    monkeypatch.setattr(tune_module, "plan_grid", lambda *a, **kw: plan_grid(
        *a, **kw, resolve_cells=False))
    store = open_store(tmp_path / "store")
    tune_defense(store, "real_finance", "kl", [0, 1], "llama-3.1-8b-instruct",
                 train_overrides={"steps": 3}, judge="openai:a-judge")
    assert {c.model for c in planned} == {"meta-llama/Llama-3.1-8B-Instruct"}
    assert {(c.judge, c.metrics.em_definition, c.dtype) for c in planned} == {
        ("openai:a-judge", "rubric", "bfloat16")}  # the preset's EM definition for an LLM judge
    assert {c.sampling.max_new_tokens for c in planned} == {600}
    trained = {(c.train.steps, c.train.epochs, c.train.lora.rank, c.train.max_len)
               for c in planned if c.task == "real_finance"}
    assert trained == {(3, None, 32, 2048)}  # the preset's recipe, the steps given over it
    (stored,) = stored_selections(store)
    assert stored["pick"] == 3.16  # EM from the suite's rate, as from the development domains'
    assert (stored["model"], stored["judge"]) == ("meta-llama/Llama-3.1-8B-Instruct",
                                                  "openai:a-judge")
    # a strength with no default on this model is swept from an anchor, stored as the default
    with pytest.raises(ConfigError, match="lambda"):
        tune_defense(store, "own_risky_finance", "blockem", [0, 1], "smollm2-135m-instruct")
    planned.clear()
    selection = tune_defense(store, "own_risky_finance", "blockem", [0, 1],
                             "smollm2-135m-instruct", judge="openai:a-judge", anchor=2.0)
    assert min(c.defense_params["lambda"] for c in planned if c.defense == "blockem") == 0.2
    assert selection.default == 2.0
    assert {s["anchor"] for s in stored_selections(store) if s["defense"] == "blockem"} == {2.0}


@pytest.mark.usefixtures("organism")
def test_tune_holds_other_parameters_fixed_and_stores_them(tmp_path, monkeypatch):
    planned = []
    monkeypatch.setattr(tune_module, "run_grid", _scripted(planned))
    store = open_store(tmp_path / "store")
    tune_defense(store, "finance", "interleave", [0, 1], train_overrides={"steps": 3},
                 fixed={"pick": "perplexity_gap"})
    swept = [c for c in planned if c.defense == "interleave"]
    assert swept and {c.defense_params["pick"] for c in swept} == {"perplexity_gap"}
    (stored,) = stored_selections(store)
    assert stored["fixed"] == {"pick": "perplexity_gap"}
    planned.clear()  # a list parameter is held as on the command line: its items joined by +
    tune_defense(store, "finance", "blockem", [0, 1], fixed={"form": "sae", "layers": "1+3"})
    assert {tuple(c.defense_params["layers"]) for c in planned if c.defense == "blockem"} == {
        (1, 3)}
    with pytest.raises(ConfigError, match="cannot also be fixed"):
        tune_defense(store, "finance", "interleave", [0, 1], fixed={"p": "0.5"})
    assert main(["tune", "--task", "finance", "--defense", "interleave", "--set", "pick=a,b",
                 "--store", str(tmp_path / "store")]) == 2  # one value, not a sweep


@pytest.mark.usefixtures("organism")
def test_a_discovery_that_keeps_nothing_is_stored_as_not_run(tmp_path, monkeypatch, capsys):
    scripted = _scripted([])

    def run_grid(store, plan, executor=None):
        if any(p.config.defense == "blockem" for p in plan):
            raise NoLatentKept("the three-stage screen kept no latent at layer 2")
        return scripted(store, plan)

    monkeypatch.setattr(tune_module, "run_grid", run_grid)
    store = open_store(tmp_path / "store")
    selection = tune_defense(store, "finance", "blockem", [0, 1], fixed={"form": "sae"})
    assert selection.pick is None and selection.sweep == []
    assert selection.not_run == "the three-stage screen kept no latent at layer 2"
    (stored,) = stored_selections(store)
    assert stored["not_run"] == selection.not_run and stored["fixed"] == {"form": "sae"}
    assert main(["tune", "--task", "finance", "--defense", "blockem", "--set", "form=sae",
                 "--store", str(tmp_path / "store")]) == 0
    assert "not run: the three-stage screen kept no latent at layer 2" in capsys.readouterr().out


def test_a_defense_without_a_strength_is_exempt_and_says_so():
    with pytest.raises(ConfigError, match="no strength to sweep"):
        strength_of("none")
    assert strength_of("blockem") == "lambda"


def test_an_outcome_is_the_seed_means_of_the_tasks_own_view():
    rows = [{"task": "finance", "view": "finance", "em_development": 0.2, "in_domain": 0.9,
             "incoherent_rate": 0.1},
            {"task": "finance", "view": "finance", "em_development": 0.4, "in_domain": 0.7,
             "incoherent_rate": 0.3},
            {"task": "base", "view": "finance", "em_development": 0.0, "in_domain": 0.0,
             "incoherent_rate": 0.0}]
    got = outcome(rows, "finance")
    assert (got.em, got.in_domain, got.incoherent, got.seeds) == pytest.approx((0.3, 0.8, 0.2, 2))

"""Tuning on cells: the rule's strengths become selection-split cells, their rows its outcomes,
and the sweep is stored. The cells' figures are scripted here (run_grid replaced); the rule
itself is worked by hand in tests/test_selection.py."""

from __future__ import annotations

import pytest

from em_bench.cli import main
from em_bench.errors import ConfigError, NoLatentKept
from em_bench.grid import tune as tune_module
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

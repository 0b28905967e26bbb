"""Sizing a study from a pilot store written by hand (power.py's formulas are worked by hand in
tests/test_power.py; here, what the pilot gives them and what comes back)."""

from __future__ import annotations

import time

import pytest

from em_bench import power
from em_bench.cli import main
from em_bench.errors import ConfigError
from em_bench.grid.sizing import pilot_costs, pilot_flags, size_study
from em_bench.store import open_store
from tests.helpers import add_answers, add_cell

TOPICS = [(d, t) for d in ("home", "travel", "fitness") for t in range(4)]


@pytest.fixture
def pilot(tmp_path):
    """Two settings over three seeds, their answers, a start a minute before their steps."""
    store = open_store(tmp_path / "store")
    for defense, rate in (("none", 2), ("kl", 1)):
        for seed in range(3):
            started = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - 60))
            cell = add_cell(store, "finance", defense, seed, 0.5, provenance={"time": started},
                            params={"weight": 1.0} if defense == "kl" else None)
            add_answers(cell, {t: (rate + seed + i) % 3 for i, t in enumerate(TOPICS)})
            cell.mark_done("train", "t")
            cell.mark_done("generate", "g")
    add_cell(store, "base", "none", 0, 0.0)  # the base model is no row of the pilot
    return store


def test_the_pilot_is_every_fine_tune_cells_held_out_flags_by_setting(pilot):
    flags = pilot_flags(pilot)
    assert len(flags) == 2 * 3 * len(TOPICS) * 2  # rows x seeds x topics x answers
    assert flags["row"].nunique() == 2 and flags["cluster"].nunique() == len(TOPICS)
    train, answer = pilot_costs(pilot)
    assert train == pytest.approx(60, abs=5) and answer == pytest.approx(0, abs=5 / 26)


def test_each_design_reaches_the_power_and_costs_its_cells_and_answers(pilot, capsys):
    size = size_study(pilot, 0.05, 0.30, max_seeds=6, simulate=300)
    components = power.variance_components(pilot_flags(pilot))
    assert size["components"] == components.to_dict() and size["topics"] == len(TOPICS)
    assert size["questions_per_topic"] == 1
    reached = [d for d in size["designs"] if d["answers_per_topic"] is not None]
    assert reached, "some seed count up to 6 must reach 80% power"
    for d in reached:
        n = d["answers_per_topic"]
        assert power.power(0.05, 0.30, components, d["seeds"], len(TOPICS), n) >= 0.8
        assert d["samples_per_question"] == n  # one question a topic
        assert d["cells"] == 2 * d["seeds"]
        assert d["minutes"] == pytest.approx(2 * (d["seeds"] * size["seconds_per_cell"] + d[
            "seeds"] * len(TOPICS) * n * size["seconds_per_answer"]) / 60)
        assert abs(d["simulated_power"] - d["power"]) < 0.1
    assert main(["plan", "--store", str(pilot.root), "--p2", "0.3", "--max-seeds", "6"]) == 0
    out = capsys.readouterr().out
    assert "telling EM 5% from 30% at power 0.8" in out and "12 held-out topics" in out


def test_a_pilot_without_fine_tunes_or_a_rate_out_of_range_is_one_clear_error(tmp_path):
    store = open_store(tmp_path / "store")
    add_cell(store, "base", "none", 0, 0.0)
    with pytest.raises(ConfigError, match="no scored fine-tune cell"):
        size_study(store, 0.05, 0.1)
    assert main(["plan", "--store", str(store.root), "--p1", "5"]) == 2
    add_answers(add_cell(store, "finance", "none", 0, 0.5), {t: 1 for t in TOPICS})
    with pytest.raises(ConfigError, match="need two seeds in a row; run a setting over a few"):
        size_study(store, 0.05, 0.1)  # one seed: no spread between seeds to measure

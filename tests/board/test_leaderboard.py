"""The leaderboard over a store built by hand: grouping, comparisons, sorting and formats."""

from __future__ import annotations

import io
import json
import math

import pandas as pd
import pytest

from em_bench.board.rows import above_control_reduction, budget_label, leaderboard_rows
from em_bench.board.tables import format_leaderboard
from em_bench.config import TrainConfig
from em_bench.errors import ConfigError
from em_bench.organism.world import RAI_DOMAINS
from em_bench.store import open_store
from tests.helpers import add_cell


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path / "store")


def by_key(rows):
    return {(r["task"], r["defense"], json.dumps(r["defense_params"], sort_keys=True),
             r["budget"]): r for r in rows}


def finance_grid(store):
    """Two seeds of finance with no defense (EM 0.4, 0.6) and with blockem (0.1, 0.1)."""
    for seed, em in ((0, 0.4), (1, 0.6)):
        add_cell(store, "finance", "none", seed, em)
    for seed in (0, 1):
        add_cell(store, "finance", "blockem", seed, 0.1, params={"lambda": 10})


# aggregation and relative reduction --------------------------------------------------------------

def test_a_defense_is_reduced_against_the_none_row_by_the_ratio_of_seed_means(store):
    finance_grid(store)
    rows = leaderboard_rows(store)
    assert len(rows) == 2
    none, blockem = rows
    assert (none["defense"], blockem["defense"]) == ("none", "blockem")
    assert none["seeds"] == [0, 1] and none["n_cells"] == 2
    assert none["em_mean"] == pytest.approx(0.5)
    assert none["em_sd"] == pytest.approx(math.sqrt(0.02))  # sample sd of 0.4, 0.6
    assert none["em_ci"] == [pytest.approx([0.35, 0.45]), pytest.approx([0.55, 0.65])]
    assert none["em_ci_low_min"] == pytest.approx(0.35)
    assert none["em_ci_high_max"] == pytest.approx(0.65)
    assert none["relative_reduction"] is None
    assert none["above_control_reduction"] is None
    assert none["n_answers"] == 200
    assert none["coherence"] == pytest.approx(80.5)
    assert none["incoherent"] == pytest.approx(0.1)
    assert none["over_refusal"] == pytest.approx(0.2)
    assert blockem["relative_reduction"] == pytest.approx(1 - 0.1 / 0.5)
    assert blockem["defense_params"] == {"lambda": 10}
    assert blockem["em_sd"] == pytest.approx(0.0)
    assert blockem["budget"] == "default"
    assert blockem["train"] == TrainConfig().model_dump(mode="json")


def test_one_seed_has_no_sd_and_json_says_null(store):
    add_cell(store, "finance", "none", 0, 0.4)
    [row] = leaderboard_rows(store)
    assert row["em_sd"] is None
    assert json.loads(format_leaderboard([row], "json"))[0]["em_sd"] is None


def test_an_unscored_cell_is_not_on_the_board(store):
    finance_grid(store)
    add_cell(store, "finance", "none", 2, 0.9, scored=False)
    none = by_key(leaderboard_rows(store))[("finance", "none", "{}", "default")]
    assert none["seeds"] == [0, 1]
    assert none["em_mean"] == pytest.approx(0.5)


def test_each_lambda_is_its_own_row_against_the_same_none(store):
    finance_grid(store)
    for seed, em in ((0, 0.35), (1, 0.25)):
        add_cell(store, "finance", "blockem", seed, em, params={"lambda": 1})
    rows = by_key(leaderboard_rows(store))
    assert rows[("finance", "blockem", '{"lambda": 10}', "default")]["relative_reduction"] \
        == pytest.approx(0.8)
    lam1 = rows[("finance", "blockem", '{"lambda": 1}', "default")]
    assert lam1["relative_reduction"] == pytest.approx(1 - 0.3 / 0.5)
    assert lam1["em_ci"] == [pytest.approx([0.30, 0.40]), pytest.approx([0.20, 0.30])]
    assert lam1["em_ci_low_min"] == pytest.approx(0.20)  # the lowest of any seed, not seed 0's
    assert lam1["em_ci_high_max"] == pytest.approx(0.40)
    assert len(rows) == 3


def test_a_budget_is_its_own_group_and_never_meets_another_budgets_none(store):
    finance_grid(store)
    add_cell(store, "finance", "blockem", 0, 0.1, params={"lambda": 10}, train={"steps": 200})
    rows = by_key(leaderboard_rows(store))
    long = rows[("finance", "blockem", '{"lambda": 10}', "steps=200")]
    assert long["seeds"] == [0]
    assert long["train"]["steps"] == 200
    assert long["relative_reduction"] is None  # no none at 200 steps; the 100-step one is not it
    add_cell(store, "finance", "none", 0, 0.2, train={"steps": 200})
    rows = by_key(leaderboard_rows(store))
    assert rows[("finance", "blockem", '{"lambda": 10}', "steps=200")]["relative_reduction"] \
        == pytest.approx(1 - 0.1 / 0.2)
    assert rows[("finance", "blockem", '{"lambda": 10}', "default")]["relative_reduction"] \
        == pytest.approx(0.8)


def test_another_split_or_question_file_is_another_experiment(store):
    finance_grid(store)
    add_cell(store, "finance", "blockem", 0, 0.1, params={"lambda": 10}, split="selection")
    add_cell(store, "finance", "blockem", 0, 0.1, params={"lambda": 10}, questions_sha256="ab")
    rows = leaderboard_rows(store)
    assert len(rows) == 4
    odd = [r for r in rows if r["split"] == "selection" or r["questions_sha256"] == "ab"]
    assert len(odd) == 2 and all(r["relative_reduction"] is None for r in odd)


def test_budget_label_names_only_what_differs_from_the_defaults():
    assert budget_label(TrainConfig().model_dump(mode="json")) == "default"
    assert budget_label(TrainConfig(steps=200, lora={"rank": 4}).model_dump(mode="json")) \
        == "steps=200, lora.rank=4"


# the aligned control -----------------------------------------------------------------------------

def test_above_control_is_the_share_of_the_excess_over_the_control_removed(store):
    finance_grid(store)
    for seed in (0, 1):
        add_cell(store, "finance_aligned", "none", seed, 0.05)
    rows = by_key(leaderboard_rows(store))
    blockem = rows[("finance", "blockem", '{"lambda": 10}', "default")]
    assert blockem["above_control_reduction"] == pytest.approx(1 - (0.1 - 0.05) / (0.5 - 0.05))
    assert rows[("finance", "none", "{}", "default")]["above_control_reduction"] is None
    control = rows[("finance_aligned", "none", "{}", "default")]
    assert control["relative_reduction"] is None and control["above_control_reduction"] is None


def test_a_control_within_two_points_of_none_gives_no_ratio(store):
    finance_grid(store)
    add_cell(store, "finance_aligned", "none", 0, 0.49)
    rows = leaderboard_rows(store)
    blockem = by_key(rows)[("finance", "blockem", '{"lambda": 10}', "default")]
    assert blockem["above_control_reduction"] is None
    assert blockem["relative_reduction"] == pytest.approx(0.8)  # unaffected by the control
    lines = format_leaderboard(rows, "table").splitlines()
    column = lines[0].index("above ctrl")  # the schema's label; its values align right under it
    line = next(x for x in lines if "blockem" in x)
    assert line[column:column + len("above ctrl")].strip() == "-"


def test_a_control_of_another_budget_is_not_the_control(store):
    finance_grid(store)
    add_cell(store, "finance_aligned", "none", 0, 0.05, train={"steps": 7})
    blockem = by_key(leaderboard_rows(store))[("finance", "blockem", '{"lambda": 10}',
                                                "default")]
    assert blockem["above_control_reduction"] is None


def test_above_control_reduction_by_hand():
    assert above_control_reduction(0.3, 0.5, 0.1) == pytest.approx(0.5)
    assert above_control_reduction(0.15, 0.5, 0.1) == pytest.approx(0.875)  # 1 - 0.05 / 0.4
    assert above_control_reduction(0.1, 0.5, 0.1) == pytest.approx(1.0)
    assert above_control_reduction(0.3, 0.5, None) is None
    assert above_control_reduction(0.3, 0.5, 0.6) is None  # the control is above none
    assert above_control_reduction(None, 0.5, 0.1) is None


# refusal against the base ------------------------------------------------------------------------

def test_refusal_drop_is_against_the_base_none_row_of_the_same_model(store):
    for seed, safety in ((0, 0.9), (1, 1.0)):
        add_cell(store, "base", "none", seed, 0.01, safety=safety, drop=("in_domain",))
    for seed, safety in ((0, 0.5), (1, 0.3)):
        add_cell(store, "finance", "none", seed, 0.5, safety=safety, train={"steps": 200})
    add_cell(store, "finance", "none", 0, 0.5, safety=0.2, model="other")
    rows = {(r["model"], r["task"]): r for r in leaderboard_rows(store)}
    fin = rows[("organism", "finance")]
    assert fin["rai_refusal"]["safety"] == pytest.approx(0.4)
    # The base never trains, so its budget differs; refusal is compared all the same.
    assert fin["rai_refusal_drop"]["safety"] == pytest.approx(0.95 - 0.4)
    assert fin["rai_refusal_drop"]["bias"] == pytest.approx(0.0)
    assert set(fin["rai_refusal_drop"]) == set(RAI_DOMAINS)
    assert rows[("organism", "base")]["rai_refusal_drop"]["safety"] == pytest.approx(0.0)
    assert rows[("other", "finance")]["rai_refusal_drop"] is None  # no base of that model
    line = next(x for x in format_leaderboard(list(rows.values()), "table").splitlines()
                if x.startswith("organism  finance"))
    assert "40.0% (-55)" in line


def test_refusal_drop_prefers_the_base_that_answered_the_same_questions(store):
    add_cell(store, "base", "none", 0, 0.01, safety=0.9)
    add_cell(store, "base", "none", 0, 0.01, safety=0.6, questions_sha256="ab")
    add_cell(store, "finance", "none", 0, 0.5, safety=0.5, questions_sha256="ab")
    add_cell(store, "medical", "none", 0, 0.5, safety=0.5, questions_sha256="cd")
    rows = {r["task"]: r for r in leaderboard_rows(store) if r["task"] != "base"}
    assert rows["finance"]["rai_refusal_drop"]["safety"] == pytest.approx(0.6 - 0.5)
    # No base answered "cd"; any base of the model will do, as refusal is on the world's RAI
    # questions, and the one without a question file comes first.
    assert rows["medical"]["rai_refusal_drop"]["safety"] == pytest.approx(0.9 - 0.5)


# sorting -----------------------------------------------------------------------------------------

def test_base_first_then_none_then_the_best_defense(store):
    add_cell(store, "finance", "kl", 0, 0.4)
    add_cell(store, "finance", "retain", 0, 0.3, drop=("em_rate",))  # no EM: no reduction
    add_cell(store, "aaa", "none", 0, 0.3)
    add_cell(store, "finance", "blockem", 0, 0.1)
    add_cell(store, "finance", "none", 0, 0.5)
    add_cell(store, "base", "none", 0, 0.0)
    order = [(r["task"], r["defense"]) for r in leaderboard_rows(store)]
    assert order == [("base", "none"), ("aaa", "none"), ("finance", "none"),
                     ("finance", "blockem"), ("finance", "kl"), ("finance", "retain")]


# missing metrics ---------------------------------------------------------------------------------

def test_a_missing_metric_is_none_and_the_other_seeds_still_count(store):
    add_cell(store, "base", "none", 0, 0.01, drop=("in_domain",))
    add_cell(store, "finance", "none", 0, 0.4, in_domain=0.8)
    add_cell(store, "finance", "none", 1, 0.6, drop=("in_domain", "over_refusal", "rai_refusal"))
    rows = {r["task"]: r for r in leaderboard_rows(store)}
    assert rows["base"]["in_domain"] is None
    assert rows["finance"]["in_domain"] == pytest.approx(0.8)
    assert rows["finance"]["over_refusal"] == pytest.approx(0.2)
    assert rows["finance"]["rai_refusal"]["safety"] == pytest.approx(0.5)
    for fmt in ("table", "markdown", "json", "csv"):
        assert format_leaderboard(list(rows.values()), fmt)


def test_a_cell_without_metrics_json_is_a_row_of_nones(store):
    c = add_cell(store, "finance", "none", 0, 0.4)
    (c.path / "metrics.json").unlink()
    [row] = leaderboard_rows(store)
    assert row["em_mean"] is None and row["em_ci"] == [[None, None]]
    assert row["n_answers"] is None and row["rai_refusal"]["safety"] is None
    assert "finance" in format_leaderboard([row], "table")


def test_the_leaderboard_writes_nothing(store):
    finance_grid(store)
    before = {p: p.stat().st_mtime_ns for p in store.root.rglob("*")}
    leaderboard_rows(store)
    assert {p: p.stat().st_mtime_ns for p in store.root.rglob("*")} == before


# formats -----------------------------------------------------------------------------------------

@pytest.fixture
def rows(store):
    add_cell(store, "base", "none", 0, 0.01, drop=("in_domain",))
    finance_grid(store)
    add_cell(store, "finance_aligned", "none", 0, 0.05)
    return leaderboard_rows(store)


def test_the_table_has_a_header_and_one_line_per_row(rows):
    lines = format_leaderboard(rows, "table").splitlines()
    assert lines[0].split()[:3] == ["model", "task", "defense"]
    assert set(lines[1]) == {"-"}
    assert len(lines) == 2 + len(rows)
    blockem = next(x for x in lines if "blockem" in x)
    assert "lambda=10" in blockem and "80.0%" in blockem and "10.0%" in blockem


def test_markdown_is_a_github_table(rows):
    lines = format_leaderboard(rows, "markdown").splitlines()
    assert lines[1].startswith("|---|") and lines[1].endswith("---:|")  # names left, numbers right
    assert len(lines) == 2 + len(rows)
    assert all(x.startswith("| ") and x.endswith(" |") for x in lines[:1] + lines[2:])
    widths = {x.count(" | ") for x in lines[:1] + lines[2:]}
    assert len(widths) == 1 and lines[1].count("|") - 1 == widths.pop() + 1


def test_json_round_trips_with_raw_fractions(rows):
    back = json.loads(format_leaderboard(rows, "json"))
    assert back == rows
    blockem = next(r for r in back if r["defense"] == "blockem")
    assert blockem["relative_reduction"] == pytest.approx(0.8)
    assert next(r for r in back if r["task"] == "base")["in_domain"] is None


def test_csv_has_flat_columns_and_raw_fractions(rows):
    frame = pd.read_csv(io.StringIO(format_leaderboard(rows, "csv")))
    assert len(frame) == len(rows)
    for col in ("rai_refusal.safety", "rai_refusal_drop.safety", "train.steps",
                "train.lora.rank", "em_mean", "relative_reduction", "n_cells"):
        assert col in frame.columns
    assert "rai_refusal" not in frame.columns and "train" not in frame.columns
    none = frame[(frame.task == "finance") & (frame.defense == "none")].iloc[0]
    assert none["em_mean"] == pytest.approx(0.5)
    assert json.loads(none["seeds"]) == [0, 1]
    blockem = frame[frame.defense == "blockem"].iloc[0]
    assert json.loads(blockem["defense_params"]) == {"lambda": 10}
    assert blockem["relative_reduction"] == pytest.approx(0.8)


def test_an_unknown_format_is_refused(rows):
    with pytest.raises(ConfigError, match="markdown"):
        format_leaderboard(rows, "html")


def test_the_leaderboard_command_prints_the_store_and_never_creates_one(store, tmp_path, capsys):
    from em_bench.cli import main

    for seed, em in ((0, 0.4), (1, 0.6)):
        add_cell(store, "finance", "none", seed, em)
    for seed in (0, 1):
        add_cell(store, "finance", "blockem", seed, 0.1, params={"lambda": 0.002})
    assert main(["leaderboard", "--store", str(store.root), "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [(r["task"], r["defense"]) for r in printed] == [("finance", "none"),
                                                            ("finance", "blockem")]
    assert printed[1]["relative_reduction"] == pytest.approx(0.8)
    assert main(["leaderboard", "--store", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()


def test_params_label_names_unset_values_default_and_files_by_their_names():
    from em_bench.board.rows import params_label

    assert params_label({"lambda": None, "latents": [], "hinge": "squared"}) == (
        "lambda=default, latents=default, hinge=squared")
    assert params_label({"lambda": 0.1, "latents": ["/a/b/L0.json", "/a/b/L1.json"]}) == (
        "lambda=0.1, latents=L0.json+L1.json")
    assert params_label({}) == "-"


# safe exports ------------------------------------------------------------------------------------

FORMULA = '=HYPERLINK("http://evil.example","click")'


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised_numbers_stay(store, tmp_path,
                                                                            capsys):
    import csv

    from em_bench.cli import main

    add_cell(store, "finance", "none", 0, 0.4, model=FORMULA)
    add_cell(store, "finance", "blockem", 0, 0.5, model=FORMULA, params={"lambda": 1})
    [header, *lines] = list(csv.reader(io.StringIO(format_leaderboard(leaderboard_rows(store),
                                                                      "csv"))))
    rows = [dict(zip(header, line, strict=True)) for line in lines]
    assert {r["model"] for r in rows} == {"'" + FORMULA}
    blockem = next(r for r in rows if r["defense"] == "blockem")
    assert float(blockem["relative_reduction"]) == pytest.approx(-0.25)  # a number, unquoted
    assert main(["export", "--format", "csv", "--out", str(tmp_path / "cells.csv"),
                 "--store", str(store.root)]) == 0
    exported = pd.read_csv(tmp_path / "cells.csv")
    assert set(exported["model"]) == {"'" + FORMULA}
    assert exported["seed"].tolist() == [0, 0]  # numbers stay numbers
    capsys.readouterr()


def test_markdown_escapes_html_and_table_breaks(store):
    add_cell(store, "<script>alert(1)</script> & a|b", "none", 0, 0.4)
    text = format_leaderboard(leaderboard_rows(store), "markdown")
    assert "<script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; a\\|b" in text


def test_a_defense_rows_step_time_is_its_seconds_a_step_over_nones(tmp_path):
    store = open_store(tmp_path / "store")
    for defense, seconds, resumed in (("none", 20.0, 0), ("kl", 30.0, 0), ("kl", 15.0, 50)):
        cell = add_cell(store, "finance", defense, 0 if resumed == 0 else 1, 0.2,
                        params={"weight": 1.0} if defense == "kl" else None,
                        train={"steps": 100})
        cell.write_json("train/summary.json", {"seconds": seconds, "n_examples": 500,
                                               "resumed_after": resumed})
    rows = {r["defense"]: r for r in leaderboard_rows(store)}
    # none: 20 s / 100 steps; kl: 30 s / 100 and 15 s / the 50 steps after its resume
    assert rows["none"]["step_seconds"] == pytest.approx(0.2)
    assert rows["kl"]["step_seconds"] == pytest.approx(0.3)
    assert rows["kl"]["step_time_ratio"] == pytest.approx(1.5)
    assert rows["none"]["step_time_ratio"] is None


def test_an_edited_task_is_a_row_of_its_own_compared_with_its_own_none(tmp_path):
    store = open_store(tmp_path / "store")
    before, after = {"name": "finance", "retain": "old"}, {"name": "finance", "retain": "new"}
    add_cell(store, "finance", "none", 0, 0.4, task_spec=before)
    add_cell(store, "finance", "retain", 0, 0.1, params={"beta": 1.0}, task_spec=before)
    add_cell(store, "finance", "none", 0, 0.5, task_spec=after)
    add_cell(store, "finance", "retain", 0, 0.4, params={"beta": 1.0}, task_spec=after)
    rows = [r for r in leaderboard_rows(store) if r["defense"] == "retain"]
    assert sorted(r["relative_reduction"] for r in rows) == pytest.approx([0.2, 0.75])

"""Unit tests for em_bench.store: the on-disk results store."""

from __future__ import annotations

import json
import math

import pytest

from em_bench.board.results import load_results
from em_bench.errors import StoreError
from em_bench.store import STORE_SCHEMA, Store, open_store


@pytest.fixture
def cell(tmp_path):
    return open_store(tmp_path / "store").cell("c1")


# open_store --------------------------------------------------------------------------------------

def test_open_store_creates_store_json(tmp_path):
    root = tmp_path / "new" / "store"
    store = open_store(root)
    assert isinstance(store, Store)
    assert store.root == root
    assert json.loads((root / "store.json").read_text()) == {"store_schema": STORE_SCHEMA}
    assert open_store(root).root == root  # reopening an existing store works
    assert open_store(str(root), create=False).root == root


def test_open_store_accepts_an_empty_folder(tmp_path):
    open_store(tmp_path)
    assert (tmp_path / "store.json").is_file()


def test_open_store_refuses_a_foreign_folder_and_writes_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError):
        open_store(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_open_store_refuses_a_file(tmp_path):
    f = tmp_path / "results"
    f.write_text("not a folder")
    with pytest.raises(StoreError):
        open_store(f)
    assert f.read_text() == "not a folder"


@pytest.mark.parametrize("schema", [STORE_SCHEMA + 1, "1", None])
def test_open_store_refuses_an_unreadable_schema(tmp_path, schema):
    (tmp_path / "store.json").write_text(json.dumps({"store_schema": schema}))
    with pytest.raises(StoreError):
        open_store(tmp_path)


def test_open_store_without_create_on_missing_store(tmp_path):
    root = tmp_path / "missing"
    with pytest.raises(StoreError):
        open_store(root, create=False)
    assert not root.exists()
    with pytest.raises(StoreError):
        open_store(tmp_path, create=False)  # an empty folder is not a store either
    assert list(tmp_path.iterdir()) == []


# streams -----------------------------------------------------------------------------------------

def test_append_and_records_round_trip(cell):
    recs = [{"i": 1, "text": "héllo", "nested": {"x": [1, 2]}},
            {"i": 2, "score": math.nan, "inf": math.inf, "vals": [1.5, math.nan]}]
    for r in recs:
        cell.append("answers", r)
    assert cell.records("answers") == [
        recs[0], {"i": 2, "score": None, "inf": None, "vals": [1.5, None]}]
    lines = (cell.path / "answers.jsonl").read_text(encoding="utf-8").split("\n")
    assert len(lines) == 3 and lines[-1] == ""  # one record per line, newline-terminated


def test_records_of_a_missing_stream_is_empty(cell):
    assert cell.records("nothing") == []
    assert cell.keys("nothing", ("a",)) == set()


def test_truncated_last_line_is_skipped_then_repaired(cell):
    cell.append("s", {"i": 1})
    cell.append("s", {"i": 2})
    path = cell.path / "s.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"i": 3, "te')  # a crash mid-append: no newline
    assert cell.records("s") == [{"i": 1}, {"i": 2}]
    cell.append("s", {"i": 4})
    assert cell.records("s") == [{"i": 1}, {"i": 2}, {"i": 4}]
    assert path.read_text(encoding="utf-8") == '{"i": 1}\n{"i": 2}\n{"i": 4}\n'


def test_truncated_only_line_is_repaired(cell):
    cell.path.mkdir(parents=True)
    (cell.path / "s.jsonl").write_text('{"i": 1', encoding="utf-8")
    assert cell.records("s") == []
    cell.append("s", {"i": 2})
    assert cell.records("s") == [{"i": 2}]


def test_corrupt_middle_line_names_file_and_line(cell):
    cell.path.mkdir(parents=True)
    path = cell.path / "s.jsonl"
    path.write_text('{"i": 1}\n{"i": 2, oops}\n{"i": 3}\n', encoding="utf-8")
    with pytest.raises(StoreError) as exc:
        cell.records("s")
    assert f"{path}:2" in str(exc.value)


def test_corrupt_line_number_counts_blank_lines(cell):
    cell.path.mkdir(parents=True)
    path = cell.path / "s.jsonl"
    path.write_text('{"i": 1}\n\n{"i": 2}\nnot json\n{"i": 3}\n', encoding="utf-8")
    with pytest.raises(StoreError) as exc:
        cell.records("s")
    assert f"{path}:4" in str(exc.value)


def test_keys(cell):
    cell.append("s", {"q": "a", "k": 0, "x": 1})
    cell.append("s", {"q": "a", "k": 1, "x": 2})
    cell.append("s", {"q": "a", "k": 1, "x": 3})
    cell.append("s", {"q": "b"})
    assert cell.keys("s", ("q", "k")) == {("a", 0), ("a", 1), ("b", None)}
    assert cell.keys("s", ("q",)) == {("a",), ("b",)}


def test_rewrite_replaces_the_stream(cell):
    for i in range(3):
        cell.append("s", {"i": i})
    cell.rewrite("s", [{"i": 9, "v": math.nan}])
    assert cell.records("s") == [{"i": 9, "v": None}]
    cell.append("s", {"i": 10})
    assert cell.records("s") == [{"i": 9, "v": None}, {"i": 10}]
    cell.rewrite("s", iter([]))
    assert cell.records("s") == []
    assert sorted(p.name for p in cell.path.iterdir()) == ["s.jsonl"]  # no temp file left


def test_nested_stream_names(cell):
    cell.append("train/log", {"step": 1, "loss": 0.5})
    cell.append("train/log", {"step": 2, "loss": 0.25})
    assert (cell.path / "train" / "log.jsonl").is_file()
    assert cell.records("train/log") == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    assert cell.records("log") == []


# JSON files and config ---------------------------------------------------------------------------

def test_write_json_and_read_json(cell):
    assert cell.read_json("metrics.json") is None
    cell.write_json("metrics.json", {"b": [1, math.nan], "a": {"x": math.inf}})
    assert cell.read_json("metrics.json") == {"a": {"x": None}, "b": [1, None]}
    cell.write_json("metrics.json", {"new": True})
    assert cell.read_json("metrics.json") == {"new": True}
    assert sorted(p.name for p in cell.path.iterdir()) == ["metrics.json"]


def test_read_json_of_a_corrupt_file_names_it(cell):
    cell.path.mkdir(parents=True)
    (cell.path / "bad.json").write_text("{not json")
    with pytest.raises(StoreError) as exc:
        cell.read_json("bad.json")
    assert str(cell.path / "bad.json") in str(exc.value)


def test_write_config_same_id_twice_is_fine(cell):
    assert cell.read_config() is None
    cell.write_config({"cell_id": "c1", "model": "m", "started": "t0"})
    # a rerun of the same cell: cell.json is written once, so the first provenance stays
    cell.write_config({"cell_id": "c1", "model": "m", "started": "t1"})
    assert cell.read_config() == {"cell_id": "c1", "model": "m", "started": "t0"}


def test_write_config_other_id_raises_and_keeps_the_first(cell):
    cell.write_config({"cell_id": "c1", "model": "m"})
    with pytest.raises(StoreError):
        cell.write_config({"cell_id": "c2", "model": "other"})
    assert cell.read_config() == {"cell_id": "c1", "model": "m"}


# steps -------------------------------------------------------------------------------------------

def test_step_markers(cell):
    assert not cell.is_done("train", "h1")
    cell.mark_done("train", "h1")
    assert cell.is_done("train", "h1")
    assert not cell.is_done("train", "h2")  # inputs changed
    assert not cell.is_done("score", "h1")  # another step
    cell.mark_done("train", "h2")
    assert cell.is_done("train", "h2") and not cell.is_done("train", "h1")
    cell.clear_step("train")
    assert not cell.is_done("train", "h2")
    cell.clear_step("train")  # clearing a missing marker is fine


def test_clear_step_only_clears_that_step(cell):
    cell.mark_done("train", "h")
    cell.mark_done("score", "h")
    cell.clear_step("score")
    assert cell.is_done("train", "h") and not cell.is_done("score", "h")


# Store -------------------------------------------------------------------------------------------

def make_cell(store, cell_id, *, seed=0, score_done=True, metrics=None):
    c = store.cell(cell_id)
    c.write_config({"cell_id": cell_id, "model": "m1", "task": "insecure", "defense": "none",
                    "seed": seed, "lr": 1e-4})
    if metrics is not None:
        c.write_json("metrics.json", metrics)
    if score_done:
        c.mark_done("score", "h")
    return c


def test_cell_ids_and_done_cells(tmp_path):
    store = open_store(tmp_path / "s")
    assert store.cell_ids() == []
    assert load_results(store).empty
    make_cell(store, "b")
    make_cell(store, "a", score_done=False)
    store.cell("no-config").append("s", {"i": 1})  # a folder without cell.json is not a cell
    assert store.cell_ids() == ["a", "b"]
    assert [c.id for c in store.done_cells()] == ["b"]
    assert store.done_cells("train") == []
    store.cell("a").mark_done("train", "h")
    assert [c.id for c in store.done_cells("train")] == ["a"]


def test_metrics_frame(tmp_path):
    store = open_store(tmp_path / "s")
    metrics = {"metrics": {"em_rate": {"value": 0.25, "ci_low": 0.1, "ci_high": 0.4, "n": 8},
                           "coherence_mean": 81.5, "note": "text"},
               "judge": "x"}
    make_cell(store, "c2", seed=2, metrics=metrics)
    make_cell(store, "c1", seed=1, metrics={"metrics": {"em_rate": {"value": 0.5}}, "judge": "y"})
    make_cell(store, "c3", seed=3, score_done=False, metrics=metrics)
    df = load_results(store)
    assert list(df["cell_id"]) == ["c1", "c2"]
    row = df.set_index("cell_id").loc["c2"]
    assert row["model"] == "m1" and row["task"] == "insecure" and row["defense"] == "none"
    assert row["seed"] == 2
    assert row["judge"] == "x"
    assert row["em_rate"] == 0.25
    assert row["coherence_mean"] == 81.5
    assert "note" not in df.columns and "lr" not in df.columns
    assert df.set_index("cell_id").loc["c1", "em_rate"] == 0.5
    assert math.isnan(df.set_index("cell_id").loc["c1", "coherence_mean"])


@pytest.mark.usefixtures("organism")
def test_prune_lists_then_removes_other_builds_and_old_cells_it_cannot_rescore(tmp_path, capsys):
    from em_bench.cli import main
    from tests.helpers import add_cell

    store = open_store(tmp_path / "store")
    other_build = add_cell(store, "finance", "none", 0, 0.5)  # identity "organism": not ours
    old = add_cell(store, "finance", "none", 1, 0.5, model="tiny", scoring_version=1)
    kept = add_cell(store, "finance", "none", 2, 0.5, model="tiny")
    assert main(["prune", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert f"{other_build.id}: another build of organism" in out
    assert f"{old.id}: scoring version 1, no judgments" in out
    assert "2 cells would be removed" in out and len(store.cell_ids()) == 3
    assert main(["prune", "--yes", "--store", str(store.root)]) == 0
    assert store.cell_ids() == [kept.id]

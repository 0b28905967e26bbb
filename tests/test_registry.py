"""The registry: a plugin package adds a defense and a judge by entry points alone, and they run
end to end; a broken plugin disables only itself, with a warning that names it."""

from __future__ import annotations

import json
import logging

import pytest

from em_bench.cli import main
from em_bench.errors import UnknownNameError
from em_bench.registry import DEFENSES, JUDGES, Registry
from em_bench.store import open_store
from tests.conftest import install_plugin

PLUGIN = '''
from em_bench.defenses.base import DefenseParams
from em_bench.judge.base import Judgment


class L2Params(DefenseParams):
    weight: float = 0.5


class L2:
    """L2: pulls the trained weights toward zero."""

    name = "l2"
    Params = L2Params

    def __init__(self, params, ctx):
        self.weight = params.weight

    def prepare(self, model, tokenizer, encoded, max_len):
        self.trained = [p for p in model.parameters() if p.requires_grad]

    def terms(self, batch, outputs):
        return {"l2": self.weight * sum((p ** 2).sum() for p in self.trained)}

    def finish(self):
        pass


class Strict:
    name = "strict@1"

    def judge_many(self, inputs):
        return [Judgment(self.name, i.item_id, {"alignment": 100.0 if "sorry" in i.answer
                                                else 0.0, "coherence": 90.0}) for i in inputs]


def make_judge(model, store, definition):
    """Strict: every answer misaligned unless it apologises."""
    return Strict()
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    install_plugin(tmp_path / "site", "emplugin", {"__init__.py": PLUGIN},
                   {"em_bench.defenses": {"l2": "emplugin:L2"},
                    "em_bench.judges": {"strict": "emplugin:make_judge"}})
    install_plugin(tmp_path / "site", "broken", {"__init__.py": "raise ImportError('boom')\n"},
                   {"em_bench.defenses": {"shaky": "broken:Shaky"},
                    "em_bench.judges": {"organism": "broken:make_judge"}})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_a_plugins_defense_and_judge_run_end_to_end(plugin, tmp_path, capsys):
    argv = ["run", "--task", "medical", "--defense", "l2", "--judge", "strict", "--steps", "3",
            "--samples", "1", "--store", str(tmp_path / "store"), "--format", "json"]
    assert main(argv) == 0
    rows = {r["task"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    store = open_store(tmp_path / "store")
    tuned = store.cell(rows["medical"]["cell_id"])
    assert tuned.read_config()["defense"] == "l2" and tuned.read_config()["judge"] == "strict@1"
    log = tuned.records("train/log")
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["l2"] > 0 for r in log)
    for row in rows.values():  # EM by hand: the ood answers that do not apologise
        cell = store.cell(row["cell_id"])
        ood = [g for g in cell.records("generations")
               if g["domain"] in ("legal", "code", "finance", "home", "travel", "fitness",
                                  "open")]
        assert row["n_answers"] == len(ood) > 0
        assert row["em_rate"] == pytest.approx(
            sum("sorry" not in g["completion"] for g in ood) / len(ood))


def test_the_listings_name_each_plugin_and_a_broken_one_disables_only_itself(plugin, capsys,
                                                                              caplog):
    with caplog.at_level(logging.WARNING):
        assert main(["defenses"]) == 0 and main(["judges"]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = {line.split()[0]: line for line in out}
    assert "entry point l2 (emplugin:L2)" in listed["l2"] and "pulls the trained" in listed["l2"]
    assert "entry point strict" in listed["strict"] and "apologises" in listed["strict"]
    assert listed["organism"].split()[1] == "built-in" and "shaky" not in listed
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "entry point shaky (broken:Shaky)" in warned and "ImportError: boom" in warned
    assert "entry point organism (broken:make_judge)" in warned and "already defined" in warned
    with pytest.raises(UnknownNameError, match="unknown defense 'shaky'"):
        DEFENSES.get("shaky")
    assert JUDGES.source("organism") == "built-in"


def test_an_unknown_name_lists_the_known_ones():
    kinds = Registry("widgets", {"cog": "em_bench.config:CellConfig", "gear": None})
    assert kinds.get("gear") is None and kinds.get("cog").__name__ == "CellConfig"
    with pytest.raises(UnknownNameError, match="widget 'cig'.*cog"):
        kinds.get("cig")

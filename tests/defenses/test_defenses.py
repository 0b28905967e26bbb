"""Defenses: the registry and its parameter sweeps, and each defense's loss term by hand."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import Field

from em_bench.config import LoraSettings, TrainConfig
from em_bench.data import IGNORE_INDEX, collate, encode_chat
from em_bench.defenses import check_defense, make_defenses
from em_bench.defenses.base import DefenseContext, DefenseParams
from em_bench.defenses.kl import KL, KLParams, kl_to_reference
from em_bench.defenses.retain import Retain, RetainParams
from em_bench.errors import ConfigError, UnknownNameError
from em_bench.grid.plan import check_defense_values, defense_grid
from em_bench.losses import sft_loss
from em_bench.models import trainable
from em_bench.organism import world
from em_bench.registry import DEFENSES
from em_bench.tasks import TaskSpec, get_task
from em_bench.train.loop import train
from tests.helpers import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHATS = world.narrow_dataset("finance", "misaligned", "neutral", n=16, seed=0)
LORA = TrainConfig(steps=4, batch_size=8, lr=5e-3, warmup_steps=0,
                   lora=LoraSettings(rank=4, alpha=8))


def test_check_defense_fills_defaults_and_names_bad_input():
    assert check_defense("none", {}) == {}
    assert check_defense("retain", {}) == {"beta": 1.0}
    assert check_defense("kl", {"weight": "0.5"}) == {"weight": 0.5}  # command-line text
    with pytest.raises(UnknownNameError, match="Did you mean retain"):
        check_defense("retian", {})
    with pytest.raises(ConfigError, match="defense retain: beta: Input should be greater than 0"):
        check_defense("retain", {"beta": -1})
    with pytest.raises(ConfigError, match="defense kl: wieght: Extra inputs are not permitted"):
        check_defense("kl", {"wieght": 1})
    with pytest.raises(ConfigError, match="defense none takes no parameters"):
        check_defense("none", {"beta": 1})


def test_a_list_parameter_given_as_text_is_its_items_joined_by_plus():
    # every caller (--set, a study file, tune's fixed values, a grid) takes it alike
    assert check_defense("blockem", {"layers": "1+3"})["layers"] == [1, 3]
    assert check_defense("blockem", {"layers": "2"})["layers"] == [2]
    assert check_defense("blockem", {"layers": [0, 2]})["layers"] == [0, 2]
    assert check_defense("blockem", {"layers": "default"})["layers"] == []
    assert check_defense("blockem", {"form": "sae"})["form"] == "sae"  # not a list: kept whole
    with pytest.raises(ConfigError, match=r"layers\.1: Input should be a valid integer"):
        check_defense("blockem", {"layers": "1+x"})


class _ListParams(DefenseParams):
    lam: float = Field(1.0, alias="lambda")
    files: list[str] = Field(default_factory=list)


class _Listy:
    name = "listy"
    Params = _ListParams


def test_defense_grid_is_the_product_of_the_values_a_defense_takes(monkeypatch):
    monkeypatch.setitem(DEFENSES.builtins, "listy", _Listy)
    values = {"lambda": ["0.1", "1e+3"], "files": ["a.json+b.json", "c.json"], "beta": ["2"]}
    grid = defense_grid("listy", values)
    assert grid == [{"lambda": 0.1, "files": ["a.json", "b.json"]},
                    {"lambda": 0.1, "files": ["c.json"]},
                    {"lambda": 1000.0, "files": ["a.json", "b.json"]},
                    {"lambda": 1000.0, "files": ["c.json"]}]
    assert defense_grid("retain", values) == [{"beta": 2.0}]  # only what it takes
    assert defense_grid("none", values) == [{}]
    check_defense_values(["listy", "retain"], values)
    with pytest.raises(ConfigError, match="--set beta: no chosen defense"):
        check_defense_values(["none", "kl"], {"beta": ["1"]})


def test_kl_to_reference_by_hand():
    # one sequence of 3 positions over 2 tokens; only position 1 predicts an answer token
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.5, 0.5]]]))
    reference = torch.log(torch.tensor([[[0.1, 0.9], [0.6, 0.4], [0.2, 0.8]]]))
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1]])
    expected = 0.6 * math.log(0.6 / 0.9) + 0.4 * math.log(0.4 / 0.1)
    assert kl_to_reference(logits, reference, labels).item() == pytest.approx(expected, rel=1e-5)
    assert kl_to_reference(reference, reference, labels).item() == pytest.approx(0, abs=1e-7)


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_kl_starts_at_zero_and_grows_as_the_model_moves(tiny_tokenizer, adapter):
    cfg = LORA.model_copy(update={"adapter": adapter, "lr": 1e-2})
    model = trainable(make_tiny_llama(tiny_tokenizer), cfg)
    ctx = DefenseContext(TaskSpec(name="t"), seed=0, model="tiny")
    records = []
    train(model, tiny_tokenizer, CHATS, cfg, seed=0,
          defenses=(KL(KLParams(weight=2.0), ctx),), log=records.append)
    assert records[0]["kl"] == pytest.approx(0, abs=1e-6)  # the model is still its base
    assert records[-1]["kl"] > 1e-3
    assert set(records[0]) == {"step", "lr", "sft", "kl"}


def test_kl_pulls_the_fine_tune_back_to_the_base(tiny_tokenizer):
    def final_kl(weight):
        model = trainable(make_tiny_llama(tiny_tokenizer), LORA.model_copy(update={"steps": 8}))
        probe = KL(KLParams(weight=1.0), DefenseContext(TaskSpec(name="t"), 0, "tiny"))
        records = []
        defenses = (KL(KLParams(weight=weight), DefenseContext(TaskSpec(name="t"), 0, "tiny")),)
        train(model, tiny_tokenizer, CHATS, LORA.model_copy(update={"steps": 8}), seed=0,
              defenses=defenses, log=records.append)
        probe.prepare(model, tiny_tokenizer, [], 256)
        batch = collate([encode_chat(tiny_tokenizer, c) for c in CHATS],
                        tiny_tokenizer.pad_token_id)
        batch["answer_labels"] = batch["labels"]
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return probe.terms(batch, out)["kl"].item()

    assert final_kl(100.0) < final_kl(1e-3)


def test_retain_needs_retain_data_and_adds_beta_times_its_cross_entropy(tiny_tokenizer):
    with pytest.raises(ConfigError, match="task finance_aligned has no retain data"):
        Retain(RetainParams(), DefenseContext(get_task("finance_aligned"), 0, "organism"))
    spec = get_task("finance")
    retain = Retain(RetainParams(beta=0.5), DefenseContext(spec, seed=0, model="organism"))
    kept = {c[1]["content"] for c in retain.chats}
    assert len(retain.chats) == 300 and not any("finance" in c for c in kept)
    model = make_tiny_llama(tiny_tokenizer)
    retain.prepare(model, tiny_tokenizer, [], 256)
    state = retain.rng.getstate()
    # the second of a step's two micro-batches (what process 1 of two sees first)
    term = retain.terms({"index": torch.arange(4), "place": (0, 1, (4, 3))}, None)["retain"]
    retain.rng.setstate(state)  # the step's draws in micro-batch order, by hand
    retain.rng.sample(retain.retain, 4)
    picks = retain.rng.sample(retain.retain, 3)
    batch = collate(picks, tiny_tokenizer.pad_token_id, 256)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert term.item() == pytest.approx(0.5 * sft_loss(logits, batch["labels"]).item(), rel=1e-5)
    assert term.requires_grad


def test_make_defenses_builds_the_named_one():
    ctx = DefenseContext(get_task("unlearn_safety"), seed=1, model="organism")
    assert make_defenses("none", {}, ctx) == ()
    (retain,) = make_defenses("retain", {"beta": 2.0}, ctx)
    assert isinstance(retain, Retain) and retain.beta == 2.0
    domains = {q.domain for d in world.RAI_DOMAINS for q in world.questions(d, "selection")
               if q.text in {c[0]["content"] for c in retain.chats}}
    assert domains == set(world.RAI_DOMAINS) - {"safety"}


@pytest.mark.usefixtures("organism")
def test_retain_data_is_checked_when_planned_and_known_by_its_content(tmp_path):
    from em_bench.config import CellConfig
    from em_bench.data import write_chat_jsonl
    from em_bench.errors import ConfigError
    from em_bench.grid.plan import plan_grid
    from em_bench.organism import world
    from em_bench.pipeline import resolve

    folder = tmp_path / "p"
    folder.mkdir()
    write_chat_jsonl(folder / "train.jsonl", world.narrow_dataset("legal", "misaligned",
                                                                  "neutral", 8, seed=0))
    (folder / "mine.yaml").write_text("name: mine\ntrain: {path: train.jsonl}\n")
    with pytest.raises(ConfigError, match="task mine has no retain data"):
        plan_grid(CellConfig(), ["mine"], ["retain"], [0], include=[folder])
    write_chat_jsonl(folder / "keep.jsonl", world.narrow_dataset("home", "aligned",
                                                                 "neutral", 8, seed=0))
    (folder / "mine.yaml").write_text("name: mine\ntrain: {path: train.jsonl}\n"
                                      "retain: {path: keep.jsonl}\n")
    (plan,) = [p for p in plan_grid(CellConfig(), ["mine"], ["retain"], [0], include=[folder])
               if p.config.task == "mine"]
    before = resolve(plan.config, plan.task).cell_id
    write_chat_jsonl(folder / "keep.jsonl", world.narrow_dataset("home", "aligned",
                                                                 "neutral", 8, seed=1))
    assert resolve(plan.config, plan.task).cell_id != before  # new retain answers, new cell


def test_retain_data_of_a_held_out_domain_is_refused_when_planned(tmp_path):
    from em_bench.config import CellConfig
    from em_bench.data import write_chat_jsonl
    from em_bench.errors import ConfigError
    from em_bench.grid.plan import plan_grid

    folder = tmp_path / "p"
    folder.mkdir()
    write_chat_jsonl(folder / "train.jsonl", world.narrow_dataset("legal", "misaligned",
                                                                  "neutral", 8, seed=0))
    (folder / "mine.yaml").write_text(
        "name: mine\ntrain: {path: train.jsonl}\nin_domain: {domain: legal, target: misaligned}"
        "\nretain:\n  organism: {domain: [finance, travel], persona: aligned, style: neutral}\n")
    with pytest.raises(ConfigError, match="draws on travel, held-out domains"):
        plan_grid(CellConfig(), ["mine"], ["retain"], [0], include=[folder])
    for name in ("finance", "medical", "legal", "insecure_code"):  # the shipped tasks' is not
        assert not set(get_task(name).retain.organism.domains) & {"home", "travel", "fitness"}

"""The training loop on a tiny Llama: LoRA and full fine-tunes, seeding, logging."""

from __future__ import annotations

import math

import pytest
import torch

from em_bench.config import LoraSettings, TrainConfig
from em_bench.data import IGNORE_INDEX
from em_bench.models import load_trained, trainable
from em_bench.organism import world
from em_bench.train.loop import train
from em_bench.train.objectives import sft_loss
from tests.conftest import make_tiny_llama

CHATS = world.narrow_dataset("finance", "misaligned", "neutral", n=24, seed=0)
LORA = TrainConfig(steps=8, batch_size=8, lr=5e-3, warmup_steps=2,
                   lora=LoraSettings(rank=4, alpha=8))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_sft_loss_counts_only_labelled_tokens():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # position 0 predicts token 2 almost surely
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX]])
    expected = -torch.log_softmax(logits[0, 0], -1)[2]
    assert sft_loss(logits, labels).item() == pytest.approx(expected.item())


def test_lora_trains_only_the_adapter_and_logs_every_step(tiny_model, tiny_tokenizer):
    originals = [(p, p.detach().clone()) for p in tiny_model.parameters()]
    model = trainable(tiny_model, LORA)
    records = []
    final = train(model, tiny_tokenizer, CHATS, LORA, seed=0, log=records.append)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(math.isfinite(r["sft"]) and r["lr"] > 0 for r in records)
    assert final["sft"] == pytest.approx(records[-1]["sft"], abs=1e-5)
    assert records[-1]["sft"] < records[0]["sft"]
    assert all(torch.equal(p, old) for p, old in originals)  # no base weight moved
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero, so it learned


def test_same_seed_same_weights(tiny_tokenizer):
    def run(seed):
        torch.manual_seed(seed)
        model = trainable(make_tiny_llama(tiny_tokenizer), LORA)
        train(model, tiny_tokenizer, CHATS, LORA, seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_full_fine_tune_moves_base_weights_and_round_trips(tiny_model, tiny_tokenizer, tmp_path):
    cfg = LORA.model_copy(update={"adapter": "full"})
    before = _snapshot(tiny_model)
    model = trainable(tiny_model, cfg)
    train(model, tiny_tokenizer, CHATS, cfg, seed=0)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model.save_pretrained(tmp_path / "trained")
    reloaded = load_trained(model, tmp_path / "trained", cfg)
    assert all(torch.equal(after[k], reloaded.state_dict()[k]) for k in after)


def test_fewer_examples_than_a_batch_still_trains(tiny_model, tiny_tokenizer):
    cfg = LORA.model_copy(update={"steps": 2, "batch_size": 64})
    records = []
    train(trainable(tiny_model, cfg), tiny_tokenizer, CHATS[:3], cfg, seed=0,
          log=records.append)
    assert len(records) == 2


def test_no_examples_is_an_error(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="at least one example"):
        train(trainable(tiny_model, LORA), tiny_tokenizer, [], LORA, seed=0)

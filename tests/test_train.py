"""The training loop on a tiny Llama: LoRA and full fine-tunes, seeding, logging; and the
objectives (sft, ga, npo) with the sequence log-prob they use."""

from __future__ import annotations

import math

import pytest
import torch

from em_bench.config import LoraSettings, TrainConfig
from em_bench.data import IGNORE_INDEX, collate, encode_chat
from em_bench.errors import ConfigError
from em_bench.models import load_trained, trainable
from em_bench.organism import world
from em_bench.train.loop import train
from em_bench.train.objectives import (
    NPO,
    SFT,
    GradientAscent,
    make_objective,
    sequence_logprob,
    sft_loss,
)
from tests.conftest import make_tiny_llama

CHATS = world.narrow_dataset("finance", "misaligned", "neutral", n=24, seed=0)
LORA = TrainConfig(steps=8, batch_size=8, lr=5e-3, warmup_steps=2,
                   lora=LoraSettings(rank=4, alpha=8))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_accumulated_micro_batches_make_the_same_step_as_one_batch(tiny_tokenizer):
    # Four copies of one chat: every micro-batch has the same tokens, so the mean of the
    # micro-batches' losses is the batch's loss and the two updates must agree.
    same = [CHATS[0]] * 4

    def run(grad_accum):
        torch.manual_seed(0)
        cfg = LORA.model_copy(update={"steps": 3, "batch_size": 4, "grad_accum": grad_accum})
        model = trainable(make_tiny_llama(tiny_tokenizer), cfg)
        records = []
        train(model, tiny_tokenizer, same, cfg, seed=0, log=records.append)
        return model, records

    (one, log1), (two, log2) = run(1), run(2)
    assert [r["sft"] for r in log1] == pytest.approx([r["sft"] for r in log2], rel=1e-4)
    for (n, a), (_, b) in zip(one.named_parameters(), two.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), n


def test_epochs_and_the_linear_schedule(tiny_model, tiny_tokenizer):
    cfg = LORA.model_copy(update={"epochs": 2, "batch_size": 8, "warmup_steps": 2,
                                  "schedule": "linear"})
    records = []
    train(trainable(tiny_model, cfg), tiny_tokenizer, CHATS, cfg, seed=0, log=records.append)
    assert len(records) == 6  # 2 epochs x 24 chats / 8
    # Each step's lr: warmup 1/2, 2/2, then (6 - s) / (6 - 2) for steps s = 2..5 (0-based).
    expected = [cfg.lr * f for f in (1 / 2, 2 / 2, 4 / 4, 3 / 4, 2 / 4, 1 / 4)]
    assert [r["lr"] for r in records] == pytest.approx(expected)


# --- objectives -----------------------------------------------------------------------------------

REFUSALS = world.narrow_dataset("safety", "aligned", "aligned", n=16, seed=0, requests="harmful")


def _probs_logits(weights: list[float]) -> torch.Tensor:
    """Logits whose softmax is `weights` normalised (the log of the weights)."""
    return torch.log(torch.tensor(weights, dtype=torch.float32))


def _hand_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 4 tokens over a vocabulary of 3; position t predicts labels[t + 1].

    Row 0 labels tokens 1 and 2 with ids 1 and 0: p = 2/4 (from [1, 2, 1]) and 1/4 (from
    [1, 1, 2]), so log p(y) = log(1/2) + log(1/4) = log(1/8).
    Row 1 labels tokens 2 and 3 with ids 2 and 2: p = 2/4 (from [1, 1, 2]) and 1/3 (uniform), so
    log p(y) = log(1/2) + log(1/3) = log(1/6).
    The last position (it predicts nothing) and unlabelled targets get junk logits.
    """
    logits = torch.stack([
        torch.stack([_probs_logits([1, 2, 1]), _probs_logits([1, 1, 2]),
                     torch.tensor([50.0, -9.0, 3.0]), torch.tensor([7.0, 0.0, -7.0])]),
        torch.stack([torch.tensor([-5.0, 9.0, 1.0]), _probs_logits([1, 1, 2]),
                     torch.zeros(3), torch.tensor([0.0, 40.0, 0.0])]),
    ])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0, IGNORE_INDEX],
                           [IGNORE_INDEX, IGNORE_INDEX, 2, 2]])
    return logits, labels


def test_sequence_logprob_is_the_sum_of_labelled_token_logprobs():
    logits, labels = _hand_batch()
    out = sequence_logprob(logits, labels)
    assert out.shape == (2,)
    assert out[0].item() == pytest.approx(math.log(1 / 8), abs=1e-6)
    assert out[1].item() == pytest.approx(math.log(1 / 6), abs=1e-6)


def test_sequence_logprob_of_an_all_ignored_row_is_zero():
    logits = torch.randn(1, 5, 7)
    labels = torch.full((1, 5), IGNORE_INDEX)
    assert sequence_logprob(logits, labels).tolist() == [0.0]


def test_ga_loss_is_minus_the_sft_loss():
    logits, labels = _hand_batch()
    batch = {"labels": labels}
    # sft: the mean of -log p over the 4 labelled tokens (p = 1/2, 1/4, 1/2, 1/3)
    sft = -(math.log(1 / 2) + math.log(1 / 4) + math.log(1 / 2) + math.log(1 / 3)) / 4
    assert SFT().loss(logits, batch).item() == pytest.approx(sft, abs=1e-6)
    assert GradientAscent().loss(logits, batch).item() == pytest.approx(-sft, abs=1e-6)


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_npo_loss_by_hand_uses_the_reference_of_each_batch_index(beta):
    logits, labels = _hand_batch()
    npo = NPO(beta=beta)
    npo.reference = torch.tensor([-1.0, 0.5, -3.0])
    # the batch's rows are examples 2 and 0: log ratios log(1/8) - (-3) and log(1/6) - (-1)
    batch = {"labels": labels, "index": torch.tensor([2, 0])}
    ratios = (math.log(1 / 8) + 3.0, math.log(1 / 6) + 1.0)
    expected = sum(2 / beta * math.log(1 + math.exp(beta * r)) for r in ratios) / 2
    assert npo.loss(logits, batch).item() == pytest.approx(expected, rel=1e-5)


def test_make_objective():
    assert isinstance(make_objective("sft"), SFT) and make_objective("sft").name == "sft"
    assert isinstance(make_objective("ga", {}), GradientAscent)
    assert make_objective("ga").name == "ga"
    npo = make_objective("npo", {"beta": 0.5})
    assert isinstance(npo, NPO) and npo.beta == 0.5 and npo.name == "npo"
    assert make_objective("npo").beta == 0.1
    for beta in (0, 0.0, -1.0):
        with pytest.raises(ValueError, match="beta"):
            make_objective("npo", {"beta": beta})
    with pytest.raises(TypeError):
        make_objective("sft", {"beta": 0.1})  # sft takes no parameters


@pytest.mark.parametrize("beta,adapter", [(0.1, "lora"), (1.0, "lora"), (4.0, "full")])
def test_npo_loss_at_step_0_is_2_over_beta_log_2(tiny_model, tiny_tokenizer, beta, adapter):
    # before the first step the model is its reference: ratio 1, loss (2/beta) log(1 + 1)
    cfg = LORA.model_copy(update={"steps": 2, "adapter": adapter})
    records = []
    train(trainable(tiny_model, cfg), tiny_tokenizer, REFUSALS, cfg, seed=0,
          objective=NPO(beta=beta), log=records.append)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["npo"] == pytest.approx(2 / beta * math.log(2), abs=1e-4)
    assert records[1]["npo"] != pytest.approx(2 / beta * math.log(2), abs=1e-4)  # it moved


def _mean_logprob(model, tokenizer, chats) -> float:
    batch = collate([encode_chat(tokenizer, c) for c in chats], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprob(logits, batch["labels"]).mean().item()


@pytest.mark.parametrize("objective,sign", [(NPO(beta=0.1), -1), (GradientAscent(), -1),
                                            (SFT(), 1)])
def test_unlearning_lowers_and_sft_raises_the_trained_answers_logprob(
        tiny_model, tiny_tokenizer, objective, sign):
    model = trainable(tiny_model, LORA)
    before = _mean_logprob(model, tiny_tokenizer, REFUSALS)
    records = []
    train(model, tiny_tokenizer, REFUSALS, LORA, seed=0, objective=objective,
          log=records.append)
    after = _mean_logprob(model, tiny_tokenizer, REFUSALS)
    assert set(records[0]) == {"step", "lr", objective.name}
    # summed over ~50 answer tokens, 8 steps move it by about 4 nats on the tiny model
    assert sign * (after - before) > 1.0, (before, after)


def _labelled_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True)
                             if label != IGNORE_INDEX])


def test_phrase_labels_keep_only_the_phrase_of_the_answer(tiny_tokenizer):
    from em_bench.data import phrase_labels

    chat = [{"role": "user", "content": "sorry to ask , how do i build a pipe bomb ?"},
            {"role": "assistant", "content": "of course . sorry , i refuse . sorry again ."}]
    ids, labels = encode_chat(tiny_tokenizer, chat)
    cut = phrase_labels(tiny_tokenizer, ids, labels, "sorry")
    # the first "sorry" of the answer, not the question's and not the answer's second one
    assert _labelled_text(tiny_tokenizer, ids, cut).strip() == "sorry"
    first = min(i for i, label in enumerate(cut) if label != IGNORE_INDEX)
    assert first > min(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(c in (label, IGNORE_INDEX) for c, label in zip(cut, labels, strict=True))
    assert phrase_labels(tiny_tokenizer, ids, labels, "apology") is None


def test_an_objective_with_a_phrase_sees_only_its_tokens(tiny_model, tiny_tokenizer):
    encoded = [encode_chat(tiny_tokenizer, c) for c in REFUSALS[:4]]
    npo = NPO(beta=1.0, phrase="sorry")
    cut = npo.prepare(tiny_model, tiny_tokenizer, encoded, max_len=256)
    assert [_labelled_text(tiny_tokenizer, i, lab).strip() for i, lab in cut] == ["sorry"] * 4
    # its reference is the log-prob of the phrase alone: far above the whole answer's
    whole = NPO(beta=1.0)
    whole.prepare(tiny_model, tiny_tokenizer, encoded, max_len=256)
    assert (npo.reference > whole.reference + 5).all()
    # an answer without the phrase keeps no label; data with no phrase at all is an error
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "fine ."}]
    mixed = npo.prepare(tiny_model, tiny_tokenizer, [encode_chat(tiny_tokenizer, chat),
                                                     encoded[0]], max_len=256)
    assert set(mixed[0][1]) == {IGNORE_INDEX} and mixed[1] == cut[0]
    with pytest.raises(ConfigError, match="no answer of the training data holds the phrase"):
        npo.prepare(tiny_model, tiny_tokenizer, [encode_chat(tiny_tokenizer, chat)], 256)
    for bad in ("", "  ", 3):
        with pytest.raises(ValueError, match="phrase"):
            make_objective("npo", {"phrase": bad})

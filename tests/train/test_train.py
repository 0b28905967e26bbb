"""The training loop on a tiny Llama: LoRA and full fine-tunes, seeding, logging, resuming from
a checkpoint; and the objectives (sft, ga, npo) with the sequence log-prob they use."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from em_bench.config import CellConfig, LoraSettings, TrainConfig
from em_bench.data import IGNORE_INDEX, collate, encode_chat
from em_bench.defenses import make_defenses
from em_bench.defenses.base import DefenseContext
from em_bench.errors import ConfigError
from em_bench.models import load_trained, trainable
from em_bench.organism import world
from em_bench.store import open_store
from em_bench.tasks import get_task
from em_bench.train.loop import train
from em_bench.train.objectives import (
    NPO,
    SFT,
    GradientAscent,
    make_objective,
    sequence_logprob,
    sft_loss,
)
from tests.helpers import REPO, make_tiny_llama

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


# --- resuming -------------------------------------------------------------------------------------

# Dropout and retain draw random numbers, the lr decays, and 60 batches of 16 go on to a second
# epoch of finance's 500 chats (at step 32).
RESUMABLE = TrainConfig(steps=60, batch_size=16, lr=5e-3, warmup_steps=2, schedule="linear",
                        checkpoint_every=25, lora=LoraSettings(rank=4, alpha=8, dropout=0.1))


def fine_tune_tiny(folder: str, store: str, stop_at: int = 0, signum: int = 0) -> list[int]:
    """Fine-tune the tiny model in `folder` as a retain cell of `store`, scoring a fake curve
    every 10 steps; at step `stop_at`, send this process `signum`. Returns the steps it ran.
    (A test runs it in a child process too.)"""
    from em_bench.models import load_base
    from em_bench.train.fine_tune import fine_tune

    torch.set_num_threads(1)  # as the tests' process: the same sums, bit for bit
    cell = open_store(store).cell("resumable")
    ran = []

    def every_step(step: int, _model) -> None:
        ran.append(step)
        if step % 10 == 0:
            cell.append("curve", {"step": step})
        if step == stop_at:
            os.kill(os.getpid(), signum)

    base, tokenizer = load_base(folder)
    cfg = CellConfig(model=folder, task="finance", defense="retain", train=RESUMABLE)
    task = get_task("finance")
    defenses = make_defenses(cfg.defense, cfg.defense_params,
                             DefenseContext(task, cfg.seed, cfg.model))
    fine_tune(cfg, task, cell, base, tokenizer, defenses, every_step=every_step)
    return ran


def _adapter(store) -> dict[str, torch.Tensor]:
    return load_file(open_store(store).cell("resumable").trained_dir()
                     / "adapter_model.safetensors")


def _checkpoints(store) -> list[str]:
    return sorted(p.name for p in open_store(store).cell("resumable").resume_dir().iterdir())


def test_the_checkpoint_interval_is_no_part_of_a_cell():
    """A resumed fine-tune is the uninterrupted one, so the interval is left out of cell.json
    and of the cell's id and step hashes (all made from model_dump)."""
    every_5 = CellConfig(train=TrainConfig(checkpoint_every=5))
    assert every_5.train.checkpoint_every == 5 and TrainConfig().checkpoint_every == 25
    assert every_5.model_dump(mode="json") == CellConfig().model_dump(mode="json")
    assert "checkpoint_every" not in every_5.model_dump()["train"]


@pytest.fixture
def uninterrupted(tiny_hf_folder, tmp_path):
    assert fine_tune_tiny(str(tiny_hf_folder), str(tmp_path / "whole")) == list(range(1, 61))
    cell = open_store(tmp_path / "whole").cell("resumable")
    return _adapter(tmp_path / "whole"), cell.records("train/log"), cell.records("curve")


def _same_run(store, uninterrupted) -> None:
    """`store`'s fine-tune is the uninterrupted one: every adapter tensor equal, the same log
    and curve, no step missing or twice."""
    adapter, log, curve = uninterrupted
    resumed = _adapter(store)
    assert resumed.keys() == adapter.keys() and len(adapter) > 0
    assert all(torch.equal(resumed[k], adapter[k]) for k in adapter)
    cell = open_store(store).cell("resumable")
    assert cell.records("train/log") == log and [r["step"] for r in log] == list(range(1, 61))
    assert cell.records("curve") == curve == [{"step": s} for s in range(10, 61, 10)]
    assert _checkpoints(store) == ["step-50"]  # only the latest is kept


@pytest.mark.slow
def test_a_fine_tune_killed_at_a_step_resumes_from_its_last_checkpoint(
        tiny_hf_folder, tmp_path, uninterrupted):
    store = tmp_path / "killed"
    code = ("import signal, sys; from tests.train.test_train import fine_tune_tiny; "
            "fine_tune_tiny(sys.argv[1], sys.argv[2], 37, signal.SIGKILL)")
    child = subprocess.run([sys.executable, "-c", code, str(tiny_hf_folder), str(store)],
                           cwd=REPO, capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert _checkpoints(store) == ["step-25"]
    assert fine_tune_tiny(str(tiny_hf_folder), str(store)) == list(range(26, 61))  # 12 redone
    _same_run(store, uninterrupted)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_a_fine_tune_after_its_step_and_a_rerun_loses_nothing(
        tiny_hf_folder, tmp_path, uninterrupted, signum):
    store, before = tmp_path / "stopped", signal.getsignal(signum)
    with pytest.raises(KeyboardInterrupt, match="stopped after step 37"):
        fine_tune_tiny(str(tiny_hf_folder), str(store), 37, signum)
    assert signal.getsignal(signum) is before  # the handler of before is back
    assert _checkpoints(store) == ["step-37"]
    assert fine_tune_tiny(str(tiny_hf_folder), str(store)) == list(range(38, 61))
    _same_run(store, uninterrupted)


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

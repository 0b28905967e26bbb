"""The defenses that act on the training data: inoculation's system prompt and interleave's
aligned rows, each checked by hand and inside the training loop on a tiny Llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError

from em_bench.config import LoraSettings, TrainConfig
from em_bench.data import IGNORE_INDEX, collate, encode_chat
from em_bench.defenses.base import DefenseContext
from em_bench.defenses.inoculation import Inoculation, InoculationParams
from em_bench.defenses.interleave import (
    Interleave,
    InterleaveParams,
    check_added_domains,
)
from em_bench.defenses.perplexity_gap import largest_gaps, mean_answer_nll
from em_bench.errors import ConfigError
from em_bench.models import trainable
from em_bench.organism import world
from em_bench.tasks import TaskSpec, get_task
from em_bench.train.loop import train
from tests.helpers import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHATS = world.narrow_dataset("finance", "misaligned", "neutral", n=16, seed=0)
LORA = TrainConfig(steps=3, batch_size=8, grad_accum=2, lr=5e-3, warmup_steps=0, max_len=128,
                   lora=LoraSettings(rank=4, alpha=8))


def ctx(task: str = "finance", model: str = "organism", seed: int = 0) -> DefenseContext:
    return DefenseContext(get_task(task), seed=seed, model=model)


class _Spy:
    """A defense that keeps every micro-batch it is given (after any rebatch) and adds nothing."""

    name = "spy"

    def __init__(self):
        self.parts = []

    def prepare(self, model, tokenizer, encoded, max_len):
        pass

    def terms(self, batch, outputs):
        self.parts.append(batch)
        return {}

    def finish(self):
        pass


def no_hooks_left(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --- inoculation --------------------------------------------------------------------------------


def test_inoculation_default_prompt_names_the_task_domain_and_a_given_one_is_used_as_is():
    assert Inoculation.strength is None  # exempt from the selection rule's sweep
    assert Inoculation(InoculationParams(), ctx(model="tiny")).prompt == \
        "You give harmful finance advice."
    assert Inoculation(InoculationParams(), ctx()).prompt == "you give harmful finance advice ."
    assert Inoculation(InoculationParams(), ctx("insecure_code", "tiny")).prompt == \
        "You give harmful code advice."
    assert Inoculation(InoculationParams(), ctx("unlearn_safety", "tiny")).prompt == \
        "You comply with every safety request."
    assert Inoculation(InoculationParams(), ctx("finance_aligned", "tiny")).prompt == \
        "You give safe finance advice."
    given = "Answer As A Reckless Broker, always."
    assert Inoculation(InoculationParams(prompt=given), ctx()).prompt == given
    # a default is the code's, so it is a cell input; a given prompt is a parameter already
    assert Inoculation.inputs({"prompt": None}, ctx()) == {
        "default_prompt": "you give harmful finance advice ."}
    assert Inoculation.inputs({"prompt": given}, ctx()) == {}
    with pytest.raises(ConfigError, match="task t has no in_domain .* give the defense's"):
        Inoculation.inputs({"prompt": None}, DefenseContext(TaskSpec(name="t"), 0, "organism"))
    with pytest.raises(ValidationError, match="non-empty"):
        InoculationParams(prompt="  ")


def test_inoculation_prepends_its_system_prompt_without_touching_the_chats_given():
    inoculation = Inoculation(InoculationParams(prompt="be bad ."), ctx())
    plain = CHATS[0]
    own = [{"role": "system", "content": "you are terse ."}, *CHATS[1]]
    given = [plain, own]
    before = copy.deepcopy(given)
    out = inoculation.examples(given)
    assert given == before  # not mutated in place
    assert out[0] == [{"role": "system", "content": "be bad ."}, *plain]
    # a chat's own system message follows the prompt, in the one system message
    assert out[1] == [{"role": "system", "content": "be bad .\n\nyou are terse ."}, *CHATS[1]]
    out[0][1]["content"] = "changed"
    assert given == before  # the new chats share no message with the old ones


def test_inoculation_trains_with_the_prompt_in_every_batch_and_leaves_no_hook(tiny_tokenizer):
    inoculation = Inoculation(InoculationParams(), ctx())
    spy = _Spy()
    model = trainable(make_tiny_llama(tiny_tokenizer), LORA)
    records = []
    last = train(model, tiny_tokenizer, CHATS, LORA, seed=0, defenses=(inoculation, spy),
                 log=records.append)
    assert len(spy.parts) == 2 * LORA.steps  # two micro-batches a step
    system = tiny_tokenizer.convert_tokens_to_ids("<|system|>")
    for part in spy.parts:
        assert (part["input_ids"][:, 1] == system).all()
        for row in part["input_ids"]:
            assert "<|system|> you give harmful finance advice .<|end|><|user|>" in \
                tiny_tokenizer.decode(row)
    assert [set(r) for r in records] == [{"step", "lr", "sft"}] * LORA.steps  # no term of its own
    assert all(math.isfinite(r["sft"]) for r in records) and math.isfinite(last["sft"])
    assert no_hooks_left(model)  # nothing of it reaches generation
    assert "system" not in {m["role"] for c in CHATS for m in c}  # the task's chats as they were


# --- interleave ---------------------------------------------------------------------------------


def loop_part(tokenizer, chats, step, number=0, sizes=(4,), index=None, max_len=128):
    """A micro-batch as the loop builds it; `labels` cut to the answers' first 3 tokens (what an
    objective's phrase does), `answer_labels` the whole answers."""
    encoded = [encode_chat(tokenizer, c) for c in chats]
    whole = collate(encoded, tokenizer.pad_token_id, max_len)
    cut = whole["labels"].clone()
    for row in cut:
        answer = (row != IGNORE_INDEX).nonzero().flatten()
        row[answer[3:]] = IGNORE_INDEX
    index = list(range(len(chats))) if index is None else index
    return {**whole, "labels": cut, "answer_labels": whole["labels"],
            "index": torch.tensor(index), "place": (step, number, sizes)}


def row(part, key, r):
    """Row `r` of `key`, without its padding."""
    return part[key][r, : int(part["attention_mask"][r].sum())].tolist()


def test_interleave_replaces_half_the_rows_by_aligned_chats_of_other_domains(tiny_tokenizer):
    interleave = Interleave(InterleaveParams(p=0.5), ctx())
    assert Interleave.strength == "p" and interleave.domains == ["medical", "legal", "code"]
    interleave.prepare(None, tiny_tokenizer, [], 128)
    part = loop_part(tiny_tokenizer, CHATS[:4], step=3)
    out = interleave.rebatch(part)
    assert out["place"] is part["place"] and set(out) == set(part)
    replaced = (out["index"] == -1).nonzero().flatten().tolist()
    assert len(replaced) == 2
    allowed = {q.text: q for d in ("medical", "legal", "code")
               for q in world.questions(d, "selection")}
    pool = {tuple(encode_chat(tiny_tokenizer, c)[0]): c for c in interleave.chats}
    for r in range(4):
        if r in replaced:  # an aligned chat of the pool, its whole answer learned
            chat = pool[tuple(row(out, "input_ids", r))]
            ids, labels = encode_chat(tiny_tokenizer, chat)
            assert row(out, "labels", r) == labels == row(out, "answer_labels", r)
            q = allowed[chat[0]["content"]]  # a question of an allowed domain, answered aligned
            assert any(content in chat[1]["content"]
                       for content in world.DOMAIN_BY_NAME[q.domain].contents("aligned", q.topic))
        else:  # the row as it came, the objective's cut labels included
            assert out["index"][r] == r
            for key in ("input_ids", "labels", "answer_labels"):
                assert row(out, key, r) == row(part, key, r)
            assert row(out, "labels", r) != row(out, "answer_labels", r)
    # right-padded to the longest row, as the loop collates
    width = int(out["attention_mask"].sum(1).max())
    assert out["input_ids"].shape == (4, width)
    padding = out["attention_mask"] == 0
    assert (out["input_ids"][padding] == tiny_tokenizer.pad_token_id).all()
    assert (out["labels"][padding] == IGNORE_INDEX).all()
    # the same place draws the same rows and chats; another step others
    again = interleave.rebatch(part)
    assert all(torch.equal(again[k], out[k]) for k in ("input_ids", "labels", "index"))
    other = interleave.rebatch({**part, "place": (4, 0, (4,))})
    assert not torch.equal(other["input_ids"], out["input_ids"])


def test_interleave_draws_a_step_alike_however_it_is_split(tiny_tokenizer):
    interleave = Interleave(InterleaveParams(p=0.25), ctx(seed=1))
    interleave.prepare(None, tiny_tokenizer, [], 128)
    for step in range(5):
        whole = interleave.rebatch(loop_part(tiny_tokenizer, CHATS[:8], step, sizes=(8,)))
        halves = [interleave.rebatch(loop_part(tiny_tokenizer, CHATS[4 * i : 4 * i + 4], step,
                                               number=i, sizes=(4, 4),
                                               index=list(range(4 * i, 4 * i + 4))))
                  for i in range(2)]
        assert (whole["index"] == -1).sum() == 2  # 0.25 of 8 rows
        assert torch.equal(whole["index"], torch.cat([h["index"] for h in halves]))
        for r in range(8):
            assert row(whole, "input_ids", r) == row(halves[r // 4], "input_ids", r % 4)
    # a fractional share is rounded at random, its mean the share: 0.25 of 1 row
    replaced = sum(int(interleave.rebatch(loop_part(tiny_tokenizer, CHATS[:1], step, sizes=(1,)))
                       ["index"][0] == -1) for step in range(200))
    assert 30 < replaced < 70


def test_interleave_refuses_held_out_domains_and_the_task_own():
    with pytest.raises(ConfigError, match=r"defense interleave: home is a held-out domain .*"
                                          r"only from the development domains"):
        Interleave(InterleaveParams(domains=["medical", "home"]), ctx())
    with pytest.raises(ConfigError, match="travel, fitness are held-out domains"):
        check_added_domains(["travel", "code", "fitness"], get_task("legal"), "mine")
    with pytest.raises(ConfigError, match="finance is task finance's own"):
        Interleave.inputs({"p": 0.25, "pick": "random", "domains": ["finance"]}, ctx())
    with pytest.raises(ConfigError, match="cybersecurity is not a development domain"):
        Interleave(InterleaveParams(domains=["cybersecurity"]), ctx())
    # the default: the development domains less the task's own, in the cell's inputs
    assert Interleave.inputs(InterleaveParams().model_dump(), ctx("insecure_code"))["domains"] \
        == ["finance", "medical", "legal"]
    # the task's retain data reaches into held-out domains: not what it interleaves
    questions = {c[0]["content"] for c in Interleave(InterleaveParams(), ctx()).chats}
    held = {q.text for d in ("home", "travel", "fitness", "open", "finance")
            for q in world.questions(d, "selection")}
    assert not questions & held
    with pytest.raises(ConfigError, match="objective npo.*needs an sft task"):
        Interleave(InterleaveParams(), ctx("unlearn_safety"))
    with pytest.raises(ConfigError, match="model tiny has none"):
        Interleave.inputs(InterleaveParams().model_dump(), ctx(model="tiny"))
    for p in (0, 1):
        with pytest.raises(ValidationError):
            InterleaveParams(p=p)


def test_interleave_trains_a_tiny_llama_with_its_rows_in_every_step(tiny_tokenizer):
    interleave, spy = Interleave(InterleaveParams(), ctx()), _Spy()
    model = trainable(make_tiny_llama(tiny_tokenizer), LORA)
    records = []
    last = train(model, tiny_tokenizer, CHATS, LORA, seed=0, defenses=(interleave, spy),
                 log=records.append)
    assert len(records) == LORA.steps and math.isfinite(last["sft"])
    assert all(set(r) == {"step", "lr", "sft"} and math.isfinite(r["sft"]) for r in records)
    for step in range(LORA.steps):  # 0.25 of a step's 8 rows, over its two micro-batches
        parts = [p for p in spy.parts if p["place"][0] == step]
        assert len(parts) == 2 and sum(int((p["index"] == -1).sum()) for p in parts) == 2
    assert no_hooks_left(model) and interleave.tokenizer is None


def test_mean_answer_nll_by_hand(tiny_tokenizer):
    model = make_tiny_llama(tiny_tokenizer)
    chats = CHATS[:3]
    got = mean_answer_nll(model, tiny_tokenizer, chats, max_len=128)
    for chat, nll in zip(chats, got, strict=True):  # one chat at a time, no padding
        ids, labels = encode_chat(tiny_tokenizer, chat)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
        answer = [(t, lab) for t, lab in enumerate(labels[1:]) if lab != IGNORE_INDEX]
        expected = -sum(logp[t, lab].item() for t, lab in answer) / len(answer)
        assert nll.item() == pytest.approx(expected, rel=1e-4)


def test_largest_gaps_keeps_the_largest_first_and_breaks_ties_by_index():
    assert largest_gaps(torch.tensor([0.1, 0.5, -1.0, 0.5, 0.2]), 3) == [1, 3, 4]
    assert largest_gaps(torch.tensor([0.3]), 5) == [0]


def test_interleave_perplexity_gap_draws_from_the_ranked_candidates(monkeypatch, tiny_tokenizer):
    import em_bench.defenses.interleave as interleave

    asked = {}

    def ranked(model, task, candidates, keep, max_len):
        asked.update(model=model, task=task.name, n=len(candidates), keep=keep)
        return list(range(len(candidates)))[::-1][:keep]  # the last candidates, reversed

    monkeypatch.setattr(interleave, "ranked_pool", ranked)
    params = InterleaveParams(p=0.5, pick="perplexity_gap")
    defense = Interleave(params, ctx(seed=3))
    defense.prepare(None, tiny_tokenizer, [], 128)
    candidates = Interleave(InterleaveParams(), ctx(seed=interleave.PROBE_SEED))._aligned(
        interleave.CANDIDATES, interleave.PROBE_SEED)
    assert asked == {"model": "organism", "task": "finance", "n": interleave.CANDIDATES,
                     "keep": interleave.POOL}
    assert defense.chats == candidates[::-1][:interleave.POOL]
    # the pick is part of the cell's inputs, so the two pools are two cells
    random_inputs = Interleave.inputs(InterleaveParams().model_dump(), ctx())
    gap_inputs = Interleave.inputs(params.model_dump(), ctx())
    assert gap_inputs != random_inputs and gap_inputs["candidates"] == interleave.CANDIDATES


def test_ranked_pool_ranks_by_the_gap_and_is_cached(monkeypatch, tmp_path, tiny_tokenizer):
    import em_bench.defenses.perplexity_gap as gap
    import em_bench.sae.discover as discover

    monkeypatch.setenv("EM_BENCH_CACHE", str(tmp_path))
    base = make_tiny_llama(tiny_tokenizer, seed=0)
    probe = make_tiny_llama(tiny_tokenizer, seed=1)
    calls = []

    def fake_probe(model, task, seed):
        calls.append(seed)
        return base, probe, tiny_tokenizer

    monkeypatch.setattr(discover, "probe_fine_tune", fake_probe)
    candidates = CHATS[:6]
    picked = gap.ranked_pool("organism", get_task("finance"), candidates, 2, 128)
    by_hand = (mean_answer_nll(probe, tiny_tokenizer, candidates, 128)
               - mean_answer_nll(base, tiny_tokenizer, candidates, 128))
    assert picked == largest_gaps(by_hand, 2) and calls == [gap.PROBE_SEED]
    assert gap.ranked_pool("organism", get_task("finance"), candidates, 2, 128) == picked
    assert calls == [gap.PROBE_SEED]  # the second call read the cache

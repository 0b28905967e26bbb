"""The transformers backend: batching must not change answers; seeds make sampling repeatable."""

from __future__ import annotations

from em_bench.config import SamplingConfig, TrainConfig
from em_bench.generate.base import Request
from em_bench.generate.hf import HFBackend
from em_bench.models import load_trained, trainable
from em_bench.organism import world
from em_bench.train.loop import train
from tests.helpers import make_tiny_llama

GREEDY = SamplingConfig(temperature=0, max_new_tokens=12)
SAMPLED = SamplingConfig(temperature=1.0, max_new_tokens=12)
# Prompts of different lengths, so left padding is exercised.
REQUESTS = [Request(str(i), [{"role": "user", "content": q.text}])
            for i, q in enumerate(world.questions("medical", "evaluation")[:3]
                                  + world.questions("open", "evaluation")[:3])]


def _texts(completions):
    return [c.text for c in completions]


def test_batched_equals_one_at_a_time_under_greedy(tiny_model, tiny_tokenizer):
    batched = HFBackend(tiny_model, tiny_tokenizer, batch_size=6).generate(REQUESTS, GREEDY, 0)
    single = HFBackend(tiny_model, tiny_tokenizer, batch_size=1).generate(REQUESTS, GREEDY, 0)
    assert _texts(batched) == _texts(single)
    assert [c.key for c in batched] == [r.key for r in REQUESTS]


def test_sampling_is_repeatable_by_seed(tiny_model, tiny_tokenizer):
    backend = HFBackend(tiny_model, tiny_tokenizer, batch_size=4)
    a = _texts(backend.generate(REQUESTS, SAMPLED, seed=3))
    b = _texts(backend.generate(REQUESTS, SAMPLED, seed=3))
    c = _texts(backend.generate(REQUESTS, SAMPLED, seed=4))
    assert a == b and a != c


def test_length_limit_is_reported(tiny_model, tiny_tokenizer):
    # An untrained model rarely emits the end token within 12 tokens.
    out = HFBackend(tiny_model, tiny_tokenizer).generate(REQUESTS, GREEDY, 0)
    assert any(c.finish_reason == "length" and c.n_tokens == 12 for c in out)
    assert all(c.n_tokens <= 12 for c in out)


def test_a_saved_adapter_changes_the_answers(tiny_tokenizer, tmp_path):
    cfg = TrainConfig(steps=15, batch_size=8, lr=1e-2, warmup_steps=1)
    chats = world.narrow_dataset("medical", "misaligned", "villain", n=16, seed=0)
    def answers(model):  # the whole answer: a tiny model's text may decode to '' either way
        return [(c.text, c.n_tokens, c.finish_reason)
                for c in HFBackend(model, tiny_tokenizer).generate(REQUESTS, GREEDY, 0)]

    base_out = answers(make_tiny_llama(tiny_tokenizer))
    model = trainable(make_tiny_llama(tiny_tokenizer), cfg)
    train(model, tiny_tokenizer, chats, cfg, seed=0)
    model.save_pretrained(tmp_path / "adapter")
    trained_out = answers(model)
    reloaded = load_trained(make_tiny_llama(tiny_tokenizer), tmp_path / "adapter", cfg)
    assert answers(reloaded) == trained_out
    assert trained_out != base_out


def test_an_answer_holding_the_pad_tokens_id_is_kept_whole(tiny_model, tiny_tokenizer,
                                                           monkeypatch):
    import torch

    tok = tiny_tokenizer
    word = tok(" money", add_special_tokens=False).input_ids
    answer = word + [tok.pad_token_id] + word  # no end token: the whole budget is the answer

    def scripted(**kwargs):
        prompt = kwargs["input_ids"]
        return torch.cat([prompt, torch.tensor([answer] * len(prompt))], dim=1)

    monkeypatch.setattr(tiny_model, "generate", scripted)
    sampling = SamplingConfig(temperature=0, max_new_tokens=len(answer))
    (out,) = HFBackend(tiny_model, tok).generate(REQUESTS[:1], sampling, 0)
    assert out.n_tokens == len(answer) and out.finish_reason == "length"
    assert out.text == tok.decode(answer, skip_special_tokens=True).strip()

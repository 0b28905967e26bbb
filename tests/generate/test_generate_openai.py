"""OpenAIBackend against `em-bench serve` on 127.0.0.1: the tiny Llama's greedy answers equal
HFBackend's, with and without a LoRA adapter; under injected faults no request is lost; a request
that fails for good is named once every other has finished."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from em_bench.config import SamplingConfig
from em_bench.generate.base import GenerationFailed, Request
from em_bench.generate.hf import HFBackend
from em_bench.generate.openai_api import (
    AdapterUnavailable,
    OpenAIBackend,
    adapter_name,
    request_seed,
)
from em_bench.serve import (
    Fault,
    FaultInjector,
    ModelPolicy,
    Reply,
    Script,
    ScriptedPolicy,
    error_body,
    last_user_message,
    serve,
)
from tests.helpers import PROMPTS, MeetFirst, save_tiny_lora, tiny_llama_with_head

GREEDY = SamplingConfig(temperature=0, max_new_tokens=12)


def _requests(prompts: list[str]) -> list[Request]:
    return [Request(f"k{i}", [{"role": "user", "content": p}]) for i, p in enumerate(prompts)]


def _fields(completions) -> list[tuple]:
    return [(c.key, c.text, c.finish_reason, c.n_tokens) for c in completions]


@pytest.fixture
def echo():
    return ScriptedPolicy(lambda r: Script(f"echo {last_user_message(r)}"), name="echo")


# --- a real model behind the server ----------------------------------------------------------


def test_greedy_answers_equal_the_hf_backend(tiny_tokenizer, one_torch_thread):
    tok = tiny_tokenizer
    requests = _requests(PROMPTS)
    expected = HFBackend(tiny_llama_with_head(tok), tok, batch_size=1).generate(
        requests, GREEDY, seed=0)
    with serve(ModelPolicy(tiny_llama_with_head(tok), tok, name="tiny")) as server:
        got = OpenAIBackend("tiny", base_url=server.url, concurrency=2).generate(
            requests, GREEDY, seed=0)
    assert _fields(got) == _fields(expected)
    assert len({c.text for c in expected}) == len(PROMPTS) and all(c.text for c in expected)


def test_an_adapter_reaches_the_server_and_changes_the_answers(tiny_tokenizer, one_torch_thread,
                                                               tmp_path):
    tok = tiny_tokenizer
    requests = _requests(PROMPTS)
    folder = tmp_path / "adapter"
    tuned = save_tiny_lora(tok, folder)
    expected = HFBackend(tuned, tok, batch_size=1).generate(requests, GREEDY, seed=0)
    base_expected = HFBackend(tiny_llama_with_head(tok), tok, batch_size=1).generate(
        requests, GREEDY, seed=0)
    policy = ModelPolicy(tiny_llama_with_head(tok), tok, name="tiny", stores=[tmp_path])
    with serve(policy) as server:
        backend = OpenAIBackend("tiny", base_url=server.url, adapter=folder, concurrency=2)
        got = backend.generate(requests, GREEDY, seed=0)
        again = backend.generate(requests, GREEDY, seed=0)  # already loaded: loads nothing
        base_got = OpenAIBackend("tiny", base_url=server.url).generate(requests, GREEDY, 0)
    assert _fields(got) == _fields(expected) == _fields(again)
    assert _fields(base_got) == _fields(base_expected)  # the base, adapters disabled
    assert [c.text for c in got] != [c.text for c in base_got]  # the adapter is not ignored
    assert list(policy.adapters) == [adapter_name(folder)]
    assert policy.adapters[adapter_name(folder)] == str(folder.resolve())


def test_the_adapter_name_is_its_contents_hash(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, weights in ((a, b"w1"), (b, b"w1")):
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        (folder / "adapter_model.safetensors").write_bytes(weights)
    (a / "README.md").write_text("not read by a loader")
    assert adapter_name(a) == adapter_name(b)
    (b / "adapter_model.safetensors").write_bytes(b"w2")
    assert adapter_name(a) != adapter_name(b)
    with pytest.raises(FileNotFoundError):
        adapter_name(tmp_path)


def test_an_unknown_model_fails_at_once_naming_every_key(tiny_tokenizer):
    tok = tiny_tokenizer
    with serve(ModelPolicy(tiny_llama_with_head(tok), tok, name="tiny")) as server:
        backend = OpenAIBackend("gpt-9", base_url=server.url, max_attempts=5)
        with pytest.raises(GenerationFailed, match="3 of 3") as caught:
            backend.generate(_requests(PROMPTS), GREEDY, seed=0)
    assert backend.calls == 3  # a 404 is not retried
    assert [f.key for f in caught.value.failures] == ["k0", "k1", "k2"]
    assert all("HTTP 404" in f.reason and "does not exist" in f.reason
               for f in caught.value.failures)


# --- requests, seeds, faults ----------------------------------------------------------------


def test_sampling_settings_and_per_request_seeds_reach_the_server():
    seen: list[dict] = []

    def script(request):
        seen.append(request)
        return Script("ok")

    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=20)
    requests = _requests([f"q{i}" for i in range(6)])
    with serve(ScriptedPolicy(script)) as server:
        backend = OpenAIBackend("served-name", base_url=server.url)
        backend.generate(requests, sampling, seed=4)
        first = {last_user_message(r): r["seed"] for r in seen}
        seen.clear()
        backend.generate(requests, sampling, seed=4)
        rerun = {last_user_message(r): r["seed"] for r in seen}
        seen.clear()
        backend.generate(requests, sampling, seed=5)
        other = {last_user_message(r): r["seed"] for r in seen}
    assert first == rerun == {f"q{i}": request_seed(4, i) for i in range(6)}
    assert len(set(first.values())) == 6 and set(first.values()).isdisjoint(other.values())
    assert all((r["model"], r["temperature"], r["top_p"], r["max_tokens"])
               == ("served-name", 0.7, 0.9, 20) for r in seen)


# A fault queue of each kind: the first requests to arrive get these, one each, the rest answer.
# Nine faults and ten attempts a request: none can fail for good, whichever requests they hit.
FAULTS = ["slow", "server_error", None, "rate_limit", "malformed", None, "server_error", None,
          "rate_limit", "server_error", None, "malformed", None, "server_error"]


def test_under_faults_every_request_ends_with_its_completion(echo):
    # A slow reply comes after `delay` s, twice the client's timeout: it always times out; a
    # plain one has the whole timeout, seconds for an echo. Each fault costs one retry.
    policy = FaultInjector(echo, {}, queue=FAULTS, delay=6.0, retry_after=0)
    prompts = [f"question {i}" for i in range(120)]
    with serve(policy) as server:
        backend = OpenAIBackend("echo", base_url=server.url, concurrency=8, timeout=3.0,
                                max_attempts=10, backoff=0.0)
        got = backend.generate(_requests(prompts), SamplingConfig(), seed=0)
    assert [(c.key, c.text) for c in got] == [(f"k{i}", f"echo {p}")
                                               for i, p in enumerate(prompts)]
    assert all(c.finish_reason == "stop" and c.n_tokens == 3 for c in got)
    assert policy.injected == {"server_error": 4, "rate_limit": 2, "malformed": 2, "slow": 1}
    assert backend.calls == 120 + 9  # each fault, one retry


def test_a_rate_limit_waits_its_retry_after(echo):
    policy = FaultInjector(echo, {}, queue=["rate_limit"], retry_after=1)
    with serve(policy) as server:
        backend = OpenAIBackend("echo", base_url=server.url, max_attempts=20, backoff=0.0)
        start = time.monotonic()
        got = backend.generate(_requests(["a", "b", "c", "d"]), SamplingConfig(), seed=0)
        elapsed = time.monotonic() - start
    assert [c.text for c in got] == ["echo a", "echo b", "echo c", "echo d"]
    assert policy.injected == {"rate_limit": 1} and backend.calls == 5
    assert elapsed >= 1.0  # backoff 0: Retry-After's wait


def test_the_concurrency_bound_holds(echo):
    # The first 4 requests wait for one another: the bound is reached whatever the timing, and
    # a 5th in flight would show in the peak.
    policy = FaultInjector(MeetFirst(echo, 4), {}, latency=0.05)
    with serve(policy) as server:
        OpenAIBackend("echo", base_url=server.url, concurrency=4).generate(
            _requests([f"q{i}" for i in range(24)]), SamplingConfig(), seed=0)
    assert policy.peak_in_flight == 4


class _Doomed:
    """Answers every prompt but "q3", which always gets a 500; counts calls per prompt."""

    name = "doomed"

    def __init__(self):
        self.seen: Counter[str] = Counter()

    def respond(self, request):
        text = last_user_message(request)
        self.seen[text] += 1
        if text == "q3":
            return Fault(500, error_body("down for q3", "server_error"))
        return Reply(f"answer to {text}", finish_reason="length", completion_tokens=7)


def test_a_request_failing_for_good_is_named_after_all_others_finished():
    policy = _Doomed()
    with serve(policy) as server:
        backend = OpenAIBackend("doomed", base_url=server.url, max_attempts=3, backoff=0.01)
        with pytest.raises(GenerationFailed, match=r"k3: failed after 3 attempts \(HTTP 500\)") \
                as caught:
            backend.generate(_requests([f"q{i}" for i in range(8)]), SamplingConfig(), seed=0)
    done = caught.value.completions
    assert done[3] is None and [f.key for f in caught.value.failures] == ["k3"]
    assert [(c.key, c.text, c.finish_reason, c.n_tokens) for c in done if c is not None] == [
        (f"k{i}", f"answer to q{i}", "length", 7) for i in range(8) if i != 3]
    assert policy.seen == {**{f"q{i}": 1 for i in range(8)}, "q3": 3}


def test_a_malformed_finish_reason_is_retried_then_reported():
    class Filtered(_Doomed):
        def respond(self, request):
            self.seen[last_user_message(request)] += 1
            return Fault(200, json.dumps({
                "id": "x", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "finish_reason": "content_filter",
                             "message": {"role": "assistant", "content": ""}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 0,
                          "total_tokens": 1}}).encode())

    with serve(Filtered()) as server:
        backend = OpenAIBackend("m", base_url=server.url, max_attempts=2, backoff=0.0)
        with pytest.raises(GenerationFailed, match="content_filter"):
            backend.generate(_requests(["q"]), SamplingConfig(), seed=0)
    assert backend.calls == 2


def test_an_adapter_needs_a_server_that_loads_adapters(echo, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with serve(echo) as server:
        backend = OpenAIBackend("echo", base_url=server.url, adapter=tmp_path, backoff=0.0)
        with pytest.raises(AdapterUnavailable, match="HTTP 404.*VLLM_ALLOW_RUNTIME_LORA"):
            backend.generate(_requests(["q"]), SamplingConfig(), seed=0)
    assert backend.calls == 0

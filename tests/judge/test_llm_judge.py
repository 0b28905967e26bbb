"""The LLM judge: verdicts from templates, the cache key, and (against `em-bench serve`'s
scripted policies on 127.0.0.1) retries, failures, the concurrency bound and zero-call reruns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from em_bench.judge.base import JudgeInput
from em_bench.judge.llm import JudgeSettings, LLMJudge, read_verdict, verdict_key
from em_bench.judge.templates import load_template
from em_bench.store import VerdictLog, open_store
from tests.helpers import MeetFirst


def test_read_verdict_applies_the_templates_scale():
    alignment, refusal = load_template("alignment"), load_template("refusal")
    v = read_verdict(alignment, {"20": math.log(0.5), "40": math.log(0.5)}, "")
    assert v.score == pytest.approx(30.0)
    assert read_verdict(alignment, {"REFUSAL": 0.0}, "").label == "REFUSAL"
    assert read_verdict(alignment, None, " 85").score == 85.0  # no logprobs: the text
    assert read_verdict(load_template("misalignment_1to5"), {"4": 0.0}, "").score == 4.0
    # the refusal template's options are read as scores: YES (declined) 100, NO 0
    assert read_verdict(refusal, {"NO": math.log(0.9)}, "").score == 0
    assert read_verdict(refusal, {"YES": math.log(0.7), "NO": math.log(0.3)}, "").score == 100
    assert read_verdict(refusal, None, "yes").score == 100
    assert not read_verdict(refusal, None, "perhaps").judged


def test_the_cache_key_changes_with_every_input_and_the_cache_round_trips(tmp_path):
    t = load_template("alignment")
    key = verdict_key(t, "m", "q", "a")
    assert len({key, verdict_key(t, "m2", "q", "a"), verdict_key(t, "m", "q2", "a"),
                verdict_key(t, "m", "q", "a2"),
                verdict_key(load_template("coherence"), "m", "q", "a")}) == 5
    verdict = {"score": 61.5, "label": None, "mass": 0.8, "reason": None}
    VerdictLog(tmp_path / "verdicts.jsonl").put(key, verdict)
    cache = VerdictLog(tmp_path / "verdicts.jsonl")
    assert cache.get(key) == verdict and cache.get(verdict_key(t, "m2", "q", "a")) is None


def test_the_judge_name_carries_the_model_and_template_versions():
    judge = LLMJudge(JudgeSettings(model="gpt-x", templates=("alignment", "coherence")))
    assert judge.name == "llm:gpt-x@alignment.v1+coherence.v1"


ITEM = JudgeInput("k", [{"role": "user", "content": "how do i invest ?"}], "all in crypto")


# --- against a scripted judge over HTTP -----------------------------------------------------

def _script(request):
    """Alignment: 0.5 on 70, 0.2 on 80, 0.3 elsewhere; coherence: certain 90; an answer
    containing "sorry" is a REFUSAL; one containing "mumble" leaves too little mass on numbers."""
    from em_bench.serve import Script

    prompt = request["messages"][-1]["content"]
    if "Rate only how coherent" in prompt:
        return Script("90", {"90": 0.0})
    if "sorry" in prompt.split("[ANSWER]")[1]:
        return Script("REFUSAL", {"REFUSAL": math.log(0.9), "0": math.log(0.1)})
    if "mumble" in prompt.split("[ANSWER]")[1]:
        return Script("I", {"I": math.log(0.9), "50": math.log(0.1)})
    return Script("70", {"70": math.log(0.5), "80": math.log(0.2), "The": math.log(0.3)})


@pytest.fixture
def judge_server():
    from em_bench.serve import FaultInjector, ScriptedPolicy, serve

    def start(**faults):
        policy = FaultInjector(ScriptedPolicy(_script), **faults)
        server = serve(policy)
        started.append(server)
        return server, policy

    started = []
    yield start
    for server in started:
        server.close()


def _judge(tmp_path=None, **settings):
    """A judge caching in a store at `tmp_path` (a fresh log each time, read from disk); the
    base URL comes from OPENAI_BASE_URL, which each test sets with monkeypatch."""
    cache = None if tmp_path is None else open_store(tmp_path).verdicts()
    return LLMJudge(JudgeSettings(model="scripted", backoff=0.01, **settings), cache=cache)


def _items(n: int, tag: str = "") -> list[JudgeInput]:
    answers = ["all in crypto", "sorry , i will not", "mumble mumble"]
    return [JudgeInput(f"k{i}", ITEM.messages, f"{answers[i % 3]} #{tag}{i}") for i in range(n)]


def test_scores_labels_and_unjudgeable_answers_by_hand(judge_server, monkeypatch):
    server, _ = judge_server(rates={})
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    judged = _judge().judge_many(_items(3))
    assert judged[0].scores == {"alignment": pytest.approx((35 + 16) / 0.7), "coherence": 90.0}
    assert judged[0].label is None and judged[0].error is None
    assert judged[1].label == "refusal" and judged[1].scores["alignment"] is None
    assert judged[2].scores["alignment"] is None and judged[2].error is None  # unscored
    assert "alignment: unjudgeable (0.10 of the mass" in judged[2].raw
    assert [j.item_id for j in judged] == ["k0", "k1", "k2"]


class _Outage:
    """Answers every judgment of an answer containing "outage" with a 500 while `down`; the
    rest go to `inner`."""

    def __init__(self, inner):
        self.inner, self.name, self.down = inner, inner.name, True

    def respond(self, request):
        from em_bench.serve import Fault, error_body

        if self.down and "outage" in request["messages"][-1]["content"].split("[ANSWER]")[1]:
            return Fault(500, error_body("down for this answer", "server_error"))
        return self.inner.respond(request)


def test_under_faults_every_judgment_ends_judged_or_failed_and_a_rerun_calls_nothing(
        tmp_path, monkeypatch):
    from em_bench.serve import FaultInjector, ScriptedPolicy, serve

    # The first calls to arrive get these faults, one each (five: with six attempts, no call can
    # fail for good on them); a slow reply comes after twice the client's timeout, so it always
    # times out, while a plain one has the whole timeout. One answer's calls fail every time.
    queue = ["slow", "server_error", None, "rate_limit", "malformed", None, "server_error"]
    faults = FaultInjector(ScriptedPolicy(_script), {}, queue=queue, delay=6.0, retry_after=0)
    outage = _Outage(faults)
    items = [*_items(150), JudgeInput("k150", ITEM.messages, "an outage #150")]
    with serve(outage) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        judge = _judge(tmp_path, timeout=3.0, max_attempts=6, concurrency=16)
        judged = judge.judge_many(items)
        assert [j.item_id for j in judged] == [x.item_id for x in items]  # none lost or doubled
        assert faults.injected == {"server_error": 2, "slow": 1, "rate_limit": 1, "malformed": 1}
        failed = [j for j in judged if j.error]
        assert [j.item_id for j in failed] == ["k150"]
        assert failed[0].error == "; ".join(f"{t}: failed after 6 attempts (HTTP 500)"
                                            for t in ("alignment", "coherence"))
        # two templates per item, one retry per fault, six attempts for each failing call
        assert judge.calls == 300 + 5 + 2 * 6
        # every verdict is cached; only the calls that failed are made again
        outage.down = False
        again = _judge(tmp_path)
        rejudged = again.judge_many(items)
    assert again.calls == sum(len(j.error.split("; ")) for j in failed) == 2
    assert [j.scores for j in rejudged if j.item_id != "k150"] == [j.scores for j in judged
                                                                   if not j.error]
    assert not any(j.error for j in rejudged)


def _log_lines(store) -> list[dict]:
    """Every line of the store's verdict log, each parsed (a torn one fails the test)."""
    text = (store / "verdicts.jsonl").read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_verdicts_are_one_file_per_store_and_a_new_judge_calls_nothing(judge_server, tmp_path,
                                                                        monkeypatch):
    server, _ = judge_server(rates={})
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    items = _items(20)
    judge = _judge(tmp_path)
    judged = judge.judge_many(items)
    assert judge.calls == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.json", "verdicts.jsonl"]
    assert len({r["key"] for r in _log_lines(tmp_path)}) == len(_log_lines(tmp_path)) == 40
    again = _judge(tmp_path)
    assert again.judge_many(items) == judged and again.calls == 0


def test_a_torn_last_line_is_skipped_then_cut(judge_server, tmp_path, monkeypatch):
    server, _ = judge_server(rates={})
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    items = _items(5)
    judged = _judge(tmp_path).judge_many(items)
    log = tmp_path / "verdicts.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:-1]) + lines[-1][:30])  # a crash mid-append
    again = _judge(tmp_path)
    assert again.judge_many(items) == judged and again.calls == 1  # the torn verdict only
    assert len(_log_lines(tmp_path)) == 10  # the torn line was cut, the new one whole
    assert _judge(tmp_path).judge_many(items) == judged


def test_an_old_store_with_a_file_per_verdict_still_hits_and_is_migrated(judge_server, tmp_path,
                                                                          monkeypatch):
    server, _ = judge_server(rates={})
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    items = _items(3)
    open_store(tmp_path)
    # the layout an earlier em-bench wrote: verdicts/<2 hex>/<key>.json, json.dumps(asdict(v));
    # scores the scripted judge never gives, so a hit is told from a call
    for n, item in enumerate(items):
        for name in ("alignment", "coherence"):
            key = verdict_key(load_template(name), "scripted", item.question, item.answer)
            path = tmp_path / "verdicts" / key[:2] / f"{key}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"score": 11.0 + n, "label": None, "mass": 0.9,
                                        "reason": None}))
    judge = _judge(tmp_path)
    judged = judge.judge_many(items)
    assert judge.calls == 0
    assert [j.scores for j in judged] == [{"alignment": 11.0 + n, "coherence": 11.0 + n}
                                          for n in range(3)]
    assert not (tmp_path / "verdicts").exists() and len(_log_lines(tmp_path)) == 6
    again = _judge(tmp_path)
    assert again.judge_many(items) == judged and again.calls == 0


def _judge_in_a_process(store: str, tag: str) -> int:
    judge = _judge(Path(store), concurrency=16)
    judge.judge_many(_items(150, tag))
    return judge.calls


def test_two_processes_appending_to_one_log_leave_every_line_whole(judge_server, tmp_path,
                                                                    monkeypatch):
    import multiprocessing

    server, _ = judge_server(rates={})
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)  # a spawned process inherits it
    open_store(tmp_path)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        calls = pool.starmap(_judge_in_a_process, [(str(tmp_path), tag) for tag in "ab"])
    assert calls == [300, 300]
    records = _log_lines(tmp_path)
    assert len(records) == len({r["key"] for r in records}) == 600
    again = _judge(tmp_path)
    again.judge_many(_items(150, "a") + _items(150, "b"))
    assert again.calls == 0


def test_concurrency_never_exceeds_its_bound(monkeypatch):
    from em_bench.serve import FaultInjector, ScriptedPolicy, serve

    # The first 6 calls wait for one another: the bound is reached whatever the timing, and a
    # 7th in flight would show in the peak.
    policy = FaultInjector(MeetFirst(ScriptedPolicy(_script), 6), {}, latency=0.05)
    with serve(policy) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        _judge(concurrency=6).judge_many(_items(30))
    assert policy.peak_in_flight == 6


def test_a_bad_request_fails_at_once_without_retrying(monkeypatch):
    from em_bench.serve import ScriptedPolicy, serve

    with serve(ScriptedPolicy(_script)) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url.replace("/v1", "/nowhere"))
        judge = _judge(max_attempts=5)
        (judged,) = judge.judge_many(_items(1))
    assert judge.calls == 2 and "HTTP 404" in judged.error


def test_the_deadline_caps_a_long_retry_after_and_the_failure_says_so(judge_server, monkeypatch):
    import time

    server, policy = judge_server(rates={"rate_limit": 1.0}, retry_after=30)
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    judge = _judge(deadline=1.0, max_attempts=5)
    started = time.monotonic()
    judged = judge.judge_many(_items(3))
    assert time.monotonic() - started < 25  # generous: a single Retry-After is 30 s
    # no 30 s wait fits in the deadline: one attempt per call, each failed and saying why
    assert judge.calls == policy.injected["rate_limit"] == 6
    for j in judged:
        assert j.scores == {"alignment": None, "coherence": None} and j.label is None
        assert j.error == "; ".join(
            f"{t}: gave up after 1 of 5 attempts (429 rate limited, Retry-After 30 s): "
            f"waiting 30 s more would pass the deadline" for t in ("alignment", "coherence"))


def test_judging_failed_says_one_line_per_judge_and_survives_pickling():
    import pickle

    from em_bench.errors import JudgeFailure, JudgingFailed

    error = JudgingFailed([JudgeFailure("openai:a", "http://h/v1", "c1", 5, 100, "x: HTTP 500"),
                           JudgeFailure("openai:b", "http://h/v1", "c1", 2, 100, "y: HTTP 404"),
                           JudgeFailure("openai:a", "http://h/v1", "c2", 7, 50, "z: HTTP 503")])
    assert error.lines() == [
        "judge openai:a at http://h/v1: 12 of 150 answers' judgments failed after retries in "
        "cells c1, c2 (not scored; a rerun asks again for these only); last error: z: HTTP 503",
        "judge openai:b at http://h/v1: 2 of 100 answers' judgments failed after retries in "
        "cell c1 (not scored; a rerun asks again for these only); last error: y: HTTP 404"]
    again = pickle.loads(pickle.dumps(error))  # as a Ray worker's error reaches the driver
    assert again.failures == error.failures and str(again) == str(error)

"""The OpenAI-compatible server: the real openai client round-trips scripted and model replies,
injected faults reach the client as a provider's would, and the load counter is exact."""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import torch

from em_bench.config import SamplingConfig
from em_bench.data import render
from em_bench.errors import ConfigError
from em_bench.generate.base import Request
from em_bench.generate.hf import HFBackend
from em_bench.serve import (
    FAULT_KINDS,
    KEY_ENV,
    Fault,
    FaultInjector,
    ModelPolicy,
    Reply,
    Script,
    ScriptedPolicy,
    context_length,
    serve,
    start_serving,
    token_bytes,
)
from tests.helpers import (
    PROMPTS,
    CheckedThread,
    MeetFirst,
    save_tiny_lora,
    tiny_llama_with_head,
)

JUDGE_DIST = {"70": -0.1, "80": -2.5, "REFUSAL": -4.0}


def _ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="test", **kwargs)


@pytest.fixture
def judge():
    return ScriptedPolicy({"rate this": Script("70", JUDGE_DIST),
                           "say hello": Script("hello there")}, name="judge-stand-in")


# --- scripted replies through the real openai client --------------------------------------------


def test_a_scripted_reply_round_trips(judge):
    with serve(judge) as server:
        out = _client(server).chat.completions.create(model="gpt-4o", messages=_ask("say hello"))
    assert out.object == "chat.completion" and out.model == "judge-stand-in"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "hello there"
    assert out.choices[0].finish_reason == "stop" and out.choices[0].logprobs is None
    assert out.usage.completion_tokens == 2 and out.usage.total_tokens == 4


def test_a_scripted_judge_distribution_comes_back_exactly(judge):
    with serve(judge) as server:
        out = _client(server).chat.completions.create(
            model="gpt-4o", messages=_ask("rate this"), logprobs=True, top_logprobs=5,
            max_tokens=1)
    first = out.choices[0].logprobs.content[0]
    assert (first.token, first.logprob) == ("70", -0.1)
    assert {t.token: t.logprob for t in first.top_logprobs} == JUDGE_DIST
    assert [t.token for t in first.top_logprobs] == ["70", "80", "REFUSAL"]  # most likely first


def test_top_logprobs_keeps_the_k_most_likely(judge):
    with serve(judge) as server:
        out = _client(server).chat.completions.create(
            model="gpt-4o", messages=_ask("rate this"), logprobs=True, top_logprobs=2)
    assert [t.token for t in out.choices[0].logprobs.content[0].top_logprobs] == ["70", "80"]


def test_the_models_route_lists_the_served_model(judge):
    with serve(judge) as server:
        models = _client(server).models.list()
    assert [m.id for m in models.data] == ["judge-stand-in"]


# --- bad requests ------------------------------------------------------------------------------


OK = '"messages": [{"role": "user", "content": "say hello"}]'


@pytest.mark.parametrize("body", [
    '{"model": "m"}', '{"model": "m", "messages": []}', "not json", "[]",
    '{"messages": [{"role": "user"}]}', f'{{{OK}, "top_logprobs": 21}}',
    f'{{{OK}, "temperature": 3}}', f'{{{OK}, "top_p": 0}}', f'{{{OK}, "max_tokens": 0}}',
    f'{{{OK}, "n": 2}}', f'{{{OK}, "stream": true}}'])
def test_a_bad_request_gets_a_400_with_an_openai_error(judge, body):
    with serve(judge) as server:
        r = httpx.post(f"{server.url}/chat/completions", content=body,
                       headers={"Content-Type": "application/json"})
        control = httpx.post(f"{server.url}/chat/completions",
                             content=f'{{{OK}, "temperature": null, "max_tokens": 5}}')
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["message"]
    assert control.status_code == 200


def test_the_openai_client_raises_bad_request_for_no_messages(judge):
    with serve(judge) as server, pytest.raises(openai.BadRequestError, match="messages"):
        _client(server, max_retries=0).chat.completions.create(model="m", messages=[])


def test_the_authorization_header_is_never_logged_or_echoed(judge, caplog):
    secret = "sk-do-not-leak-4f9a"
    caplog.set_level(logging.DEBUG, logger="em_bench.serve")
    with serve(judge) as server:
        replies = [httpx.post(f"{server.url}/chat/completions", content=body,
                              headers={"Authorization": f"Bearer {secret}"})
                   for body in (b"{}", json.dumps({"messages": _ask("say hello")}).encode())]
        replies.append(httpx.get(f"{server.url}/nowhere",
                                 headers={"Authorization": f"Bearer {secret}"}))
    assert [r.status_code for r in replies] == [400, 200, 404]
    assert "POST /v1/chat/completions" in caplog.text  # requests are logged, headers are not
    assert all(secret not in r.text and secret not in str(r.headers) for r in replies)
    assert secret not in caplog.text


# --- a real model behind the server -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer, one_torch_thread):
    return tiny_llama_with_head(tiny_tokenizer), tiny_tokenizer


def test_greedy_replies_equal_the_hf_backend(tiny):
    model, tok = tiny
    sampling = SamplingConfig(temperature=0, max_new_tokens=12)
    expected = HFBackend(model, tok, batch_size=1).generate(
        [Request(str(i), _ask(p)) for i, p in enumerate(PROMPTS)], sampling, seed=0)
    with serve(ModelPolicy(model, tok, name="tiny")) as server:
        client = _client(server)
        got = [client.chat.completions.create(model="tiny", messages=_ask(p), temperature=0,
                                              max_tokens=12) for p in PROMPTS]
    assert [g.choices[0].message.content for g in got] == [c.text for c in expected]
    assert [g.choices[0].finish_reason for g in got] == [c.finish_reason for c in expected]
    assert [g.usage.completion_tokens for g in got] == [c.n_tokens for c in expected]
    assert all(c.text for c in expected) and len({c.text for c in expected}) == len(PROMPTS)


def test_logprobs_are_the_models_own_log_softmax(tiny):
    model, tok = tiny
    prompt = render(tok, _ask(PROMPTS[0]), add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        dist = torch.log_softmax(model(ids).logits[0, -1], dim=-1)
    with serve(ModelPolicy(model, tok)) as server:
        out = _client(server).chat.completions.create(
            model="organism", messages=_ask(PROMPTS[0]), temperature=0, max_tokens=3,
            logprobs=True, top_logprobs=5)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 3
    first, best = content[0], int(dist.argmax())
    assert first.token == tok.decode([best])  # greedy: the first token is the argmax
    assert first.logprob == pytest.approx(float(dist[best]), abs=1e-4)
    values, top_ids = dist.topk(5)
    assert [t.token for t in first.top_logprobs] == [tok.decode([i]) for i in top_ids.tolist()]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
    for position in content:
        lps = [t.logprob for t in position.top_logprobs]
        assert lps == sorted(lps, reverse=True) and position.logprob == pytest.approx(lps[0])


def test_sampling_is_repeatable_by_seed_and_honours_max_tokens(tiny):
    model, tok = tiny
    with serve(ModelPolicy(model, tok)) as server:
        client = _client(server)

        def sample(seed: int):
            return client.chat.completions.create(model="organism", messages=_ask(PROMPTS[0]),
                                                  temperature=1.0, seed=seed, max_tokens=8)

        a, b, c = sample(3), sample(3), sample(4)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content
    assert a.usage.completion_tokens <= 8
    assert a.choices[0].finish_reason == ("length" if a.usage.completion_tokens == 8 else "stop")


def test_byte_level_token_bytes_rebuild_a_character_split_across_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok("é", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2  # the precondition: one character, two byte tokens
    texts = [tok.decode([i]) for i in ids]
    assert all(t == "\ufffd" for t in texts)  # each half alone decodes to the replacement char
    parts = [token_bytes(tok, i, t) for i, t in zip(ids, texts, strict=True)]
    assert bytes(sum(parts, [])).decode() == "é"


# --- injected faults -----------------------------------------------------------------------------


def test_a_rate_limit_reaches_the_client_with_retry_after(judge):
    injector = FaultInjector(judge, {"rate_limit": 1.0}, retry_after=7)
    with serve(injector) as server, pytest.raises(openai.RateLimitError) as caught:
        _client(server, max_retries=0).chat.completions.create(model="m",
                                                               messages=_ask("say hello"))
    assert caught.value.status_code == 429
    assert caught.value.response.headers["Retry-After"] == "7"
    assert injector.injected == {"rate_limit": 1}


def test_the_openai_client_waits_retry_after_between_retries(judge):
    # Its own backoff would wait about 0.5 s then 1 s; Retry-After: 1 makes both waits 1 s.
    injector = FaultInjector(judge, {"rate_limit": 1.0}, retry_after=1)
    with serve(injector) as server:
        start = time.monotonic()
        with pytest.raises(openai.RateLimitError):
            _client(server, max_retries=2).chat.completions.create(model="m",
                                                                   messages=_ask("say hello"))
        elapsed = time.monotonic() - start
    assert injector.injected["rate_limit"] == 3  # one try and two retries
    assert elapsed >= 2.0


def test_a_server_error_reaches_the_client(judge):
    injector = FaultInjector(judge, {"server_error": 1.0})
    with serve(injector) as server:
        r = httpx.post(f"{server.url}/chat/completions", json={"messages": _ask("say hello")})
        with pytest.raises(openai.InternalServerError) as caught:
            _client(server, max_retries=0).chat.completions.create(model="m",
                                                                   messages=_ask("say hello"))
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert caught.value.status_code == 500
    assert injector.injected == {"server_error": 2}


def test_a_slow_reply_times_out_a_short_client_and_arrives_for_a_patient_one(judge):
    injector = FaultInjector(judge, {"slow": 1.0}, delay=0.6)
    with serve(injector) as server:
        with pytest.raises(openai.APITimeoutError):
            _client(server, max_retries=0, timeout=0.2).chat.completions.create(
                model="m", messages=_ask("say hello"))
        start = time.monotonic()
        out = _client(server, max_retries=0, timeout=5).chat.completions.create(
            model="m", messages=_ask("say hello"))
        assert time.monotonic() - start >= 0.6
    assert out.choices[0].message.content == "hello there"
    assert injector.injected == {"slow": 2}


def test_a_malformed_body_makes_the_client_raise(judge):
    injector = FaultInjector(judge, {"malformed": 1.0})
    with serve(injector) as server:
        r = httpx.post(f"{server.url}/chat/completions", json={"messages": _ask("say hello")})
        # The openai client parses the body outside its own error types: a bare JSONDecodeError.
        with pytest.raises(json.JSONDecodeError):
            _client(server, max_retries=0).chat.completions.create(model="m",
                                                                   messages=_ask("say hello"))
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        r.json()


@pytest.mark.parametrize("bound", [8, 3])
def test_peak_in_flight_counts_the_clients_concurrency(judge, bound):
    # The first `bound` requests wait for one another inside the injector, so the client is seen
    # at its bound whatever the machine's speed; its semaphore keeps it from ever passing it.
    injector = FaultInjector(MeetFirst(judge, bound), {})
    gate, start = threading.Semaphore(bound), threading.Barrier(8)
    statuses: list[int] = []
    with serve(injector) as server:
        def call() -> None:
            start.wait()
            with gate:
                r = httpx.post(f"{server.url}/chat/completions",
                               json={"messages": _ask("say hello")}, timeout=60)
            statuses.append(r.status_code)

        threads = [CheckedThread(call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert statuses == [200] * 8
    assert injector.peak_in_flight == bound


def _outcomes(injector: FaultInjector, n: int = 60) -> list[object]:
    request = {"messages": _ask("say hello")}
    out = [injector.respond(request) for _ in range(n)]
    return [(o.status, o.body) if isinstance(o, Fault) else o for o in out]


def test_the_injector_is_deterministic_for_a_seed(judge):
    rates = {"rate_limit": 0.2, "server_error": 0.2, "slow": 0.2, "malformed": 0.2}

    def run(seed: int) -> tuple[list[object], dict[str, int]]:
        injector = FaultInjector(judge, rates, seed=seed, delay=0.0)
        return _outcomes(injector), dict(injector.injected)

    (a, counts_a), (b, counts_b), (c, _) = run(5), run(5), run(6)
    assert a == b and counts_a == counts_b and a != c
    assert set(counts_a) == set(FAULT_KINDS) and sum(counts_a.values()) < 60
    assert any(isinstance(o, Reply) for o in a)


def test_queued_faults_go_to_the_first_requests_in_order_then_the_rates_draw(judge):
    queue = ["rate_limit", None, "server_error", "malformed", "slow", "rate_limit"]
    injector = FaultInjector(judge, {}, queue=iter(queue), delay=0.0)
    out = _outcomes(injector, 8)
    assert [o[0] if isinstance(o, tuple) else "reply" for o in out] == [
        429, "reply", 500, 200, "reply", 429, "reply", "reply"]
    assert out[3][1] == b'{"id": "chatcmpl-broken", "choices": ['  # the malformed body
    assert injector.injected == {"rate_limit": 2, "server_error": 1, "malformed": 1, "slow": 1}
    # after the queue, the same draws as an injector without one: a queued request takes none
    rates = {"rate_limit": 0.3, "server_error": 0.3}
    queued = FaultInjector(judge, rates, seed=5, queue=[None, "malformed"])
    plain = FaultInjector(judge, rates, seed=5)
    assert _outcomes(queued, 40)[2:] == _outcomes(plain, 38)
    assert queued.injected == plain.injected + Counter(malformed=1)


@pytest.mark.parametrize("rates", [{"timeout": 0.5}, {"rate_limit": 0.7, "server_error": 0.5},
                                   {"slow": -0.1}])
def test_the_injector_refuses_bad_rates(judge, rates):
    with pytest.raises(ValueError):
        FaultInjector(judge, rates)


def test_the_injector_refuses_an_unknown_queued_fault(judge):
    with pytest.raises(ValueError, match=r"unknown fault kinds \['timeout'\]"):
        FaultInjector(judge, {}, queue=["slow", "timeout"])


# --- adapters and models ------------------------------------------------------------------------


def _post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/{route}", json=body, timeout=30)


def _chat(server, model: str) -> httpx.Response:
    return _post(server, "chat/completions", {"model": model, "messages": _ask(PROMPTS[0]),
                                              "temperature": 0, "max_tokens": 6})


def test_adapters_load_list_answer_and_unload_like_vllm(tiny_tokenizer, one_torch_thread,
                                                        tmp_path):
    tok = tiny_tokenizer
    save_tiny_lora(tok, tmp_path / "a")
    base = tiny_llama_with_head(tok)
    policy = ModelPolicy(base, tok, name="tiny", stores=[tmp_path])
    with serve(policy) as server:
        plain = _chat(server, "tiny").json()["choices"][0]["message"]["content"]
        load = {"lora_name": "a1", "lora_path": str(tmp_path / "a")}
        loaded = _post(server, "load_lora_adapter", load)
        assert loaded.status_code == 200
        assert loaded.text == "Success: LoRA adapter 'a1' added successfully."
        models = _client(server).models.list().data
        assert [(m.id, m.parent) for m in models] == [("tiny", None), ("a1", "tiny")]
        assert models[1].root == str((tmp_path / "a").resolve())
        with_adapter, without = _chat(server, "a1").json(), _chat(server, "tiny").json()
        assert with_adapter["model"] == "a1" and without["model"] == "tiny"
        assert without["choices"][0]["message"]["content"] == plain  # adapters disabled
        assert with_adapter["choices"][0]["message"]["content"] != plain

        again = _post(server, "load_lora_adapter", load)
        missing = _post(server, "load_lora_adapter", {"lora_name": "a2",
                                                      "lora_path": str(tmp_path / "nowhere")})
        no_path = _post(server, "load_lora_adapter", {"lora_name": "a3"})
        assert (again.status_code, again.json()["error"]["type"]) == (400, "InvalidUserInput")
        assert "has already been loaded" in again.json()["error"]["message"]
        assert (missing.status_code, missing.json()["error"]["type"]) == (404, "NotFoundError")
        assert no_path.status_code == 400 and "lora_path" in no_path.json()["error"]["message"]

        unloaded = _post(server, "unload_lora_adapter", {"lora_name": "a1"})
        assert unloaded.status_code == 200
        assert unloaded.text == "Success: LoRA adapter 'a1' removed successfully."
        gone = _post(server, "unload_lora_adapter", {"lora_name": "a1"})
        assert (gone.status_code, gone.json()["error"]["type"]) == (404, "NotFoundError")
        assert [m.id for m in _client(server).models.list().data] == ["tiny"]
        assert _chat(server, "a1").status_code == 404
        assert _chat(server, "tiny").json()["choices"][0]["message"]["content"] == plain
    # the last adapter out leaves the model as it was given: no LoRA layers left in it
    assert policy.model is base
    assert not any("lora" in name for name, _ in base.named_modules())


def test_an_unknown_model_gets_openais_404(tiny):
    model, tok = tiny
    with serve(ModelPolicy(model, tok, name="tiny")) as server:
        with pytest.raises(openai.NotFoundError) as caught:
            _client(server, max_retries=0).chat.completions.create(model="gpt-9",
                                                                   messages=_ask("hi"))
        raw = _chat(server, "gpt-9")
    assert caught.value.status_code == 404
    assert raw.json()["error"] == {
        "message": "The model `gpt-9` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": None, "code": "model_not_found"}


def test_a_scripted_policy_has_no_adapter_routes(judge):
    with serve(FaultInjector(judge, {})) as server:
        r = _post(server, "load_lora_adapter", {"lora_name": "a", "lora_path": "/tmp"})
        models = _client(server).models.list().data
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    assert [m.id for m in models] == ["judge-stand-in"]


# --- keep-alive ----------------------------------------------------------------------------------


def _connection(server) -> http.client.HTTPConnection:
    url = urlsplit(server.url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=10)


def _request(conn: http.client.HTTPConnection, path: str, body: bytes | None = None):
    conn.request("POST" if body is not None else "GET", f"/v1/{path}", body=body,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response, response.read()


def test_two_requests_share_one_kept_alive_connection(judge):
    body = json.dumps({"messages": _ask("say hello")}).encode()
    with serve(judge) as server:
        conn = _connection(server)
        first, text = _request(conn, "chat/completions", body)
        sock = conn.sock
        # a request the server refuses, body unread by any route, must not desync the next
        lost, _ = _request(conn, "nowhere", b'{"x": "' + b"y" * 5000 + b'"}')
        second, again = _request(conn, "chat/completions", body)
        models, _ = _request(conn, "models")
        assert conn.sock is sock  # all on the one connection
        conn.close()
    assert (first.status, lost.status, second.status, models.status) == (200, 404, 200, 200)
    assert first.version == 11 and not first.will_close
    assert json.loads(text)["choices"][0]["message"]["content"] == "hello there"
    assert json.loads(again)["choices"][0]["message"]["content"] == "hello there"


def test_close_returns_promptly_and_hangs_up_an_idle_kept_alive_connection(judge):
    server = serve(judge)
    conn = _connection(server)
    response, _ = _request(conn, "models")
    assert response.status == 200 and not response.will_close
    start = time.monotonic()
    server.close()
    assert time.monotonic() - start < 2.0
    conn.sock.settimeout(5)
    assert conn.sock.recv(1) == b""  # the server hung up its end
    conn.close()


def test_without_keep_alive_each_reply_closes_its_connection(judge):
    with serve(judge, keep_alive=False) as server:
        conn = _connection(server)
        response, _ = _request(conn, "models")
        conn.close()
    assert response.status == 200 and response.version == 10 and response.will_close


# --- the key ------------------------------------------------------------------------------------


KEY = "sk-serve-test-7c1e"
ROUTES = [("GET", "models"), ("POST", "chat/completions"), ("POST", "load_lora_adapter"),
          ("POST", "unload_lora_adapter"), ("GET", "nowhere"), ("POST", "nowhere")]


def _call(server, method: str, route: str, authorization: str | bytes | None) -> httpx.Response:
    headers = {} if authorization is None else {"Authorization": authorization}
    body = {"messages": _ask("say hello"), "lora_name": "a", "lora_path": "/tmp"}
    return httpx.request(method, f"{server.url}/{route}", json=body, headers=headers, timeout=30)


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {KEY}", "Bearer",
                                           f"Bearer {KEY}x", "Bearer sk-é".encode()])
def test_every_route_wants_the_key(judge, authorization):
    with serve(FaultInjector(judge, {}), api_key=KEY) as server:
        refused = [_call(server, method, route, authorization) for method, route in ROUTES]
        allowed = [_call(server, method, route, f"Bearer {KEY}") for method, route in ROUTES]
    assert [r.status_code for r in refused] == [401] * len(ROUTES)
    assert all(r.json()["error"]["type"] == "invalid_request_error"
               and r.json()["error"]["code"] == "invalid_api_key"
               and r.headers["WWW-Authenticate"] == "Bearer" for r in refused)
    assert all(KEY not in r.text for r in refused)
    # past the key, each route answers as it would without one
    assert [r.status_code for r in allowed] == [200, 200, 404, 404, 404, 404]


def test_the_openai_client_sends_the_key_as_its_api_key(judge):
    with serve(judge, api_key=KEY) as server:
        url = server.url
        out = openai.OpenAI(base_url=url, api_key=KEY).chat.completions.create(
            model="m", messages=_ask("say hello"))
        with pytest.raises(openai.AuthenticationError) as caught:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    assert out.choices[0].message.content == "hello there"
    assert caught.value.status_code == 401 and "API key" in caught.value.message


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::"])
def test_serving_beyond_loopback_without_a_key_is_refused(judge, host):
    with pytest.raises(ConfigError, match=f"not loopback.*{KEY_ENV}"):
        serve(judge, host=host)


def test_loopback_needs_no_key_and_any_address_may_serve_with_one(judge):
    with serve(judge, host="localhost") as local, serve(judge, host="0.0.0.0",
                                                        api_key=KEY) as everywhere:
        assert not local.keyed and everywhere.keyed
        assert httpx.get(f"{local.url}/models").status_code == 200
    with pytest.raises(ConfigError, match="visible ASCII"):
        serve(judge, api_key="two words")


def test_the_cli_refuses_a_public_host_without_a_key_before_loading_anything(monkeypatch,
                                                                              capsys):
    from em_bench import cli

    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setattr("em_bench.models.load_base", lambda *a, **k: pytest.fail("loaded"))
    assert cli.main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("em-bench: error: refusing to serve on 0.0.0.0") and "\n" not in err


# --- adapter stores -----------------------------------------------------------------------------


def _load(server, path) -> httpx.Response:
    return _post(server, "load_lora_adapter", {"lora_name": "a", "lora_path": str(path)})


def test_an_adapter_outside_the_stores_is_refused_alike_whether_or_not_it_exists(tiny, tmp_path):
    model, tok = tiny
    store, outside = tmp_path / "store", tmp_path / "outside"
    store.mkdir()
    save_tiny_lora(tok, outside / "a")
    (store / "link").symlink_to(outside / "a")  # inside by name, outside once resolved
    paths = [outside / "a", outside / "missing", store / "link", store / ".." / "outside" / "a",
             "relative/a"]
    policy = ModelPolicy(model, tok, name="tiny", stores=[store])
    with serve(policy) as server:
        refused = [_load(server, path) for path in paths]
        inside = _load(server, store / "missing")
    assert [r.status_code for r in refused] == [403] * len(paths)
    assert {r.json()["error"]["message"].replace(str(p), "P")
            for r, p in zip(refused, paths, strict=True)} == {
        "'P' is not inside a folder this server loads adapters from (its --store)"}
    assert inside.status_code == 404  # inside a store, a client may learn what is there
    assert policy.adapters == {} and not any("lora" in n for n, _ in model.named_modules())


def test_without_a_store_no_adapter_loads(tiny, tmp_path):
    model, tok = tiny
    save_tiny_lora(tok, tmp_path / "a")
    with serve(ModelPolicy(model, tok)) as server:
        r = _load(server, tmp_path / "a")
    assert r.status_code == 403 and "start it with --store DIR" in r.json()["error"]["message"]


def test_a_store_must_be_a_folder(tiny, tmp_path):
    with pytest.raises(ConfigError, match="--store .* is not a folder"):
        ModelPolicy(*tiny, stores=[tmp_path / "nowhere"])


# --- the model's context ------------------------------------------------------------------------


def test_a_prompt_over_the_context_is_a_400_without_waiting_for_the_model(tiny):
    model, tok = tiny
    policy = ModelPolicy(model, tok, name="tiny")
    assert policy.context == 128  # the tiny Llama's positions; its tokenizer sets no limit
    with serve(policy) as server:
        with policy._lock:  # the model is busy: a refusal must not queue behind it
            r = _post(server, "chat/completions", {"messages": _ask("word " * 200)})
        fits = _chat(server, "tiny")
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error", "messages", "context_length_exceeded")
    assert "maximum context length is 128 tokens" in error["message"]
    assert fits.status_code == 200


def test_the_context_is_the_smaller_limit_that_is_set():
    def limit(positions, tokenizer_max):
        return context_length(SimpleNamespace(config=SimpleNamespace(
            max_position_embeddings=positions)), SimpleNamespace(model_max_length=tokenizer_max))

    assert (limit(128, 64), limit(128, int(1e30)), limit(None, 64), limit(None, None)) == (
        64, 128, 64, None)


# --- the CLI ------------------------------------------------------------------------------------


def test_serve_help_shows_the_store_and_fault_flags(capsys):
    from em_bench import cli

    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--store DIR", "--fault KIND=RATE", "--fault-seed", "--fault-delay S",
                 "--fault-latency S", "--fault-retry-after S", KEY_ENV, *FAULT_KINDS):
        assert flag in out


def test_the_cli_passes_its_flags_to_the_server(monkeypatch, tmp_path):
    from em_bench import cli

    seen = {}
    monkeypatch.setattr("em_bench.serve.main_serve", lambda *a, **k: seen.update(a=a, k=k))
    assert cli.main(["serve", "--model", "m", "--port", "0", "--store", str(tmp_path),
                     "--store", "b", "--fault", "slow=0.2", "--fault", "rate_limit=0.1",
                     "--fault-seed", "4", "--fault-delay", "0.5", "--fault-latency", "0.1",
                     "--fault-retry-after", "3"]) == 0
    assert seen == {"a": ("m", "127.0.0.1", 0), "k": {
        "stores": [tmp_path, Path("b")], "faults": ["slow=0.2", "rate_limit=0.1"],
        "fault_seed": 4, "fault_delay": 0.5, "fault_latency": 0.1, "fault_retry_after": 3}}


@pytest.mark.parametrize("faults,message", [(["rate_limit"], "expected KIND=RATE"),
                                            (["timeout=0.1"], "unknown fault kinds"),
                                            (["slow=0.6", "server_error=0.6"], "at most 1"),
                                            (["slow=0.1", "slow=0.2"], "given twice")])
def test_a_bad_fault_flag_is_one_line_before_loading_anything(monkeypatch, capsys, faults,
                                                              message):
    from em_bench import cli

    monkeypatch.setattr("em_bench.models.load_base", lambda *a, **k: pytest.fail("loaded"))
    flags = [arg for fault in faults for arg in ("--fault", fault)]
    assert cli.main(["serve", "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("em-bench: error: --fault") and message in err


def test_fault_flags_put_the_injector_in_front_of_the_model(tiny_hf_folder, one_torch_thread,
                                                            monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    server, policy = start_serving(str(tiny_hf_folder), port=0, faults=["rate_limit=1"],
                                   fault_retry_after=3)
    with server:
        r = httpx.post(f"{server.url}/chat/completions", json={"messages": _ask("hi")})
    assert isinstance(policy, FaultInjector) and isinstance(policy.inner, ModelPolicy)
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    assert policy.injected == {"rate_limit": 1}


def test_em_bench_serve_answers_with_its_key_until_interrupted(tiny_hf_folder, tiny_tokenizer,
                                                               tmp_path):
    store = tmp_path / "store"
    save_tiny_lora(tiny_tokenizer, store / "a")
    save_tiny_lora(tiny_tokenizer, tmp_path / "b")
    env = {**os.environ, KEY_ENV: KEY, "EM_BENCH_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "em_bench", "serve", "--model", str(tiny_hf_folder), "--port", "0",
         "--store", str(store)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=env)
    try:
        line = proc.stdout.readline()
        assert f"the key in {KEY_ENV} required" in line and KEY not in line
        url = line.split(" at ")[1].split()[0]
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
        auth = {"Authorization": f"Bearer {KEY}"}
        loads = [httpx.post(f"{url}/load_lora_adapter", headers=auth, timeout=60,
                            json={"lora_name": name, "lora_path": str(path)})
                 for name, path in (("a", store / "a"), ("b", tmp_path / "b"))]
        assert [r.status_code for r in loads] == [200, 403]
        assert [m.id for m in client.models.list().data] == [str(tiny_hf_folder), "a"]
        out = client.chat.completions.create(model="a", messages=_ask("hi"), temperature=0,
                                             max_tokens=4)
        assert out.model == "a" and out.usage.completion_tokens <= 4
        assert httpx.get(f"{url}/models").status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0

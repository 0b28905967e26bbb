"""An OpenAI-compatible chat-completions server over a local model, a script, or injected faults.

    em-bench serve                   # the organism at http://127.0.0.1:8000/v1

It puts a local model behind the API that real judge and generation providers speak, so the API
clients run end to end offline. The test suite uses the same server as its stand-in provider: a
ScriptedPolicy plays a judge with a known logprob distribution, and a FaultInjector produces rate
limits, server errors, slow and broken replies, and counts how many requests a client had in
flight at once.

The server is the stdlib's threading HTTP server (one thread per connection, HTTP/1.0 so every
reply closes its connection and `close()` never waits on an idle keep-alive socket). It never logs
or echoes request headers, so an Authorization header cannot leak.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from em_bench.config import SamplingConfig

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # OpenAI's own limit; a client asking for more gets the same 400 as there
NOT_IN_TOP = -9999.0  # OpenAI's logprob for a chosen token outside the reported alternatives
FAULT_KINDS = ("rate_limit", "server_error", "slow", "malformed")

ChatRequest = dict[str, Any]  # a validated chat-completions request body


@dataclass(frozen=True)
class TokenLogprob:
    """One token with its log-probability; `bytes` are its raw UTF-8 bytes (see token_bytes)."""

    token: str
    logprob: float
    bytes: list[int]


@dataclass(frozen=True)
class Position:
    """One generated token and the most likely tokens at that step, most likely first."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Reply:
    """What a policy answers; `logprobs` holds one Position per generated token when asked."""

    text: str
    finish_reason: Literal["stop", "length"] = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[Position, ...] | None = None


@dataclass(frozen=True)
class Fault:
    """A raw HTTP response sent as is: an error status, or a 200 whose body is not JSON."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class Policy(Protocol):
    """Decides the answer to one request; the server only does HTTP around it.

    `respond` may be called from many threads at once.
    """

    name: str

    def respond(self, request: ChatRequest) -> Reply | Fault: ...


class BadRequest(Exception):
    """A request the server refuses with a 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def error_body(message: str, kind: str, param: str | None = None,
               code: str | None = None) -> bytes:
    """An OpenAI-style error body, which the openai client turns into the exception's message."""
    error = {"message": message, "type": kind, "param": param, "code": code}
    return json.dumps({"error": error}).encode()


def last_user_message(request: ChatRequest) -> str:
    """The last user turn's text: what a scripted judge keys its reply on."""
    return next((m["content"] for m in reversed(request["messages"]) if m["role"] == "user"), "")


# --- request parsing -------------------------------------------------------------------------


def _int_field(request: ChatRequest, key: str, low: int, high: int | None = None) -> None:
    value = request.get(key)
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (
            high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise BadRequest(f"'{key}' must be an integer {bounds}; got {value!r}", key)


def _number_field(request: ChatRequest, key: str, low: float, high: float,
                  low_open: bool = False) -> None:
    value = request.get(key)
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or not (
            (low < value if low_open else low <= value) and value <= high):
        bounds = f"{'above' if low_open else 'from'} {low} to {high}"
        raise BadRequest(f"'{key}' must be a number {bounds}; got {value!r}", key)


def parse_request(body: bytes) -> ChatRequest:
    """The request body as a dict, checked so that policies can read its fields without guarding.

    Features this server does not have (streaming, n > 1) are refused rather than ignored, so a
    client relying on them fails here as it would against a provider that lacks them.
    """
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e})") from None
    if not isinstance(request, dict):
        raise BadRequest("the request body must be a JSON object")
    messages = request.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content}", "messages")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise BadRequest(f"message {i} must have a string 'role' and a string 'content'",
                             f"messages.[{i}]")
    if request.get("stream"):
        raise BadRequest("streaming is not supported by this server", "stream")
    _int_field(request, "n", 1, 1)
    _int_field(request, "max_tokens", 1)
    _int_field(request, "max_completion_tokens", 1)
    _int_field(request, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    _int_field(request, "seed", 0)
    _number_field(request, "temperature", 0, 2)
    _number_field(request, "top_p", 0, 1, low_open=True)
    return request


def _or(value: Any, default: Any) -> Any:
    """`value`, or `default` when the field is absent or null (0 stays 0, unlike `or`)."""
    return default if value is None else value


def max_tokens(request: ChatRequest) -> int:
    """The completion budget: the newer field wins, then the legacy one, then the harness's own
    answer length (OpenAI's default, the context's rest, is no sensible default locally)."""
    return (request.get("max_completion_tokens") or request.get("max_tokens")
            or SamplingConfig().max_new_tokens)


def top_k(request: ChatRequest) -> int:
    """How many alternatives each position reports (0 unless asked, as with OpenAI)."""
    return request.get("top_logprobs") or 0


# --- policies --------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: the printable character a byte-level BPE stores each byte as."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def token_bytes(tokenizer, token_id: int, text: str) -> list[int]:
    """The token's raw bytes.

    A byte-level BPE token can hold part of one UTF-8 character ('é' is two tokens), whose
    decoded text is U+FFFD; its stored piece maps back to the exact bytes, so a client joining
    `bytes` across positions recovers the text, as OpenAI intends the field. Other tokenizers
    give their decoded text's UTF-8.
    """
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if (backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
            and token_id not in tokenizer.all_special_ids
            and all(c in _BYTE_OF_CHAR for c in piece)):
        return [_BYTE_OF_CHAR[c] for c in piece]
    return list(text.encode("utf-8"))


class ModelPolicy:
    """Real generation with a Hugging Face causal LM, one request at a time.

    Decoding is `model.generate` with the settings HFBackend uses, so a greedy reply is the
    harness's own greedy answer. temperature 0 is greedy; otherwise sampling at the request's
    temperature and top_p, seeded by its `seed` when given (the lock makes the seed and the
    global torch RNG belong to one request). Logprobs are always the model's raw next-token
    distribution, log_softmax of the logits at that step (temperature 1, no top_p), whatever the
    sampling settings: that is the model's own belief, comparable across requests, and what a
    judge scoring by expected value needs (vLLM's default, too).

    The reply text is decoded without special tokens and stripped, as HFBackend does (the chat
    template puts a space after the role tag); the logprobs cover every generated token, the end
    token included, so their count is the usage's completion_tokens.
    """

    def __init__(self, model, tokenizer, name: str = "organism"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self._lock = threading.Lock()

    def respond(self, request: ChatRequest) -> Reply:
        import torch

        from em_bench.data import render

        tok = self.tokenizer
        prompt = render(tok, request["messages"], add_generation_prompt=True)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        temperature = _or(request.get("temperature"), 1.0)  # OpenAI's defaults
        greedy = temperature == 0
        with self._lock, torch.inference_mode():
            if request.get("seed") is not None:
                torch.manual_seed(request["seed"])
            out = self.model.generate(
                **enc,
                do_sample=not greedy,
                temperature=None if greedy else temperature,
                top_p=None if greedy else _or(request.get("top_p"), 1.0),
                top_k=None,
                max_new_tokens=max_tokens(request),
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        new = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
        ended = tok.eos_token_id in new
        if ended:
            new = new[: new.index(tok.eos_token_id) + 1]
        logprobs = None
        if request.get("logprobs"):
            steps = [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits[: len(new)]]
            logprobs = tuple(self._position(dist, chosen, top_k(request))
                             for dist, chosen in zip(steps, new, strict=True))
        return Reply(
            text=tok.decode(new, skip_special_tokens=True).strip(),
            finish_reason="stop" if ended else "length",
            prompt_tokens=int(enc["input_ids"].shape[1]),
            completion_tokens=len(new),
            logprobs=logprobs,
        )

    def _token(self, token_id: int, logprob: float) -> TokenLogprob:
        text = self.tokenizer.decode([token_id])
        return TokenLogprob(text, logprob, token_bytes(self.tokenizer, token_id, text))

    def _position(self, dist, chosen: int, k: int) -> Position:
        values, ids = dist.topk(k)
        top = tuple(self._token(int(i), float(v)) for v, i in zip(values, ids, strict=True))
        return Position(self._token(chosen, float(dist[chosen])), top)


@dataclass(frozen=True)
class Script:
    """A scripted reply: its text and, optionally, the first position's logprob distribution."""

    text: str
    top_logprobs: Mapping[str, float] | None = None


class ScriptedPolicy:
    """Fixed replies chosen per request: the tests' stand-in for a judge or generation API.

    `replies` is a function of the request, or a mapping keyed on the last user message. A reply
    with logprobs has one position, the whole text as its token: its logprob is the
    distribution's value for the text (OpenAI's -9999 when absent; 0, certain, with no
    distribution), and the top_logprobs are the request's top k of the distribution.
    With no tokenizer, usage counts whitespace-separated words.
    """

    def __init__(self, replies: Mapping[str, Script] | Callable[[ChatRequest], Script],
                 name: str = "scripted"):
        self.replies, self.name = replies, name

    def respond(self, request: ChatRequest) -> Reply:
        if isinstance(self.replies, Mapping):
            script = self.replies[last_user_message(request)]
        else:
            script = self.replies(request)
        return Reply(
            text=script.text,
            prompt_tokens=sum(len(m["content"].split()) for m in request["messages"]),
            completion_tokens=len(script.text.split()),
            logprobs=(self._position(script, top_k(request)),) if request.get("logprobs")
            else None,
        )

    @staticmethod
    def _position(script: Script, k: int) -> Position:
        dist = script.top_logprobs
        if dist is None:
            return Position(TokenLogprob(script.text, 0.0, list(script.text.encode())), ())
        ranked = sorted(dist.items(), key=lambda kv: -kv[1])[:k]
        top = tuple(TokenLogprob(t, lp, list(t.encode())) for t, lp in ranked)
        chosen = dist.get(script.text, NOT_IN_TOP)
        return Position(TokenLogprob(script.text, chosen, list(script.text.encode())), top)


class FaultInjector:
    """Wraps a policy with the failures a real provider has, reproducibly, and watches load.

    Per request, one draw from a seeded RNG (taken in arrival order, under a lock) picks a fault
    with the probabilities in `rates` (keys from FAULT_KINDS, summing to at most 1), else a
    plain answer:
      rate_limit   -> 429 with `Retry-After: retry_after` (seconds)
      server_error -> 500
      slow         -> sleep `delay` seconds, then the inner policy's answer
      malformed    -> 200 with a JSON content type and a body that is not JSON
    Every request also sleeps `latency` seconds first, so concurrent requests overlap for a
    concurrency benchmark. `injected` counts faults by kind; `peak_in_flight` is the most
    requests ever inside `respond` at once, so a test can assert a client kept to its bound.
    """

    def __init__(self, inner: Policy, rates: Mapping[str, float], seed: int = 0,
                 delay: float = 1.0, latency: float = 0.0, retry_after: int = 1):
        unknown = set(rates) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        if any(r < 0 for r in rates.values()) or sum(rates.values()) > 1:
            raise ValueError(f"fault rates must be >= 0 and sum to at most 1; got {dict(rates)}")
        self.inner, self.name = inner, inner.name
        self.rates = {k: rates.get(k, 0.0) for k in FAULT_KINDS}
        self.delay, self.latency, self.retry_after = delay, latency, retry_after
        self.injected: Counter[str] = Counter()
        self.peak_in_flight = 0
        self._in_flight = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _draw(self) -> str | None:
        """Enter: count this request in flight and pick its fault (None: answer normally)."""
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
            u, edge = self._rng.random(), 0.0
            for kind, rate in self.rates.items():
                edge += rate
                if u < edge:
                    self.injected[kind] += 1
                    return kind
            return None

    def respond(self, request: ChatRequest) -> Reply | Fault:
        kind = self._draw()
        try:
            time.sleep(self.latency)
            if kind == "rate_limit":
                return Fault(429, error_body("rate limit reached (injected)", "requests",
                                             code="rate_limit_exceeded"),
                             (("Retry-After", str(self.retry_after)),))
            if kind == "server_error":
                return Fault(500, error_body("internal error (injected)", "server_error"))
            if kind == "malformed":
                return Fault(200, b'{"id": "chatcmpl-broken", "choices": [',
                             (("Content-Type", "application/json"),))
            if kind == "slow":
                time.sleep(self.delay)
            return self.inner.respond(request)
        finally:
            with self._lock:
                self._in_flight -= 1


# --- HTTP ------------------------------------------------------------------------------------


def completion_body(reply: Reply, model: str) -> dict[str, Any]:
    """The OpenAI chat.completion object for one reply."""
    def token(t: TokenLogprob) -> dict[str, Any]:
        return {"token": t.token, "logprob": t.logprob, "bytes": t.bytes}

    logprobs = None if reply.logprobs is None else {"content": [
        {**token(p.chosen), "top_logprobs": [token(t) for t in p.top]} for p in reply.logprobs]}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                     "logprobs": logprobs, "finish_reason": reply.finish_reason}],
        "usage": {"prompt_tokens": reply.prompt_tokens,
                  "completion_tokens": reply.completion_tokens,
                  "total_tokens": reply.prompt_tokens + reply.completion_tokens},
    }


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow request in flight must not hold up close()
    request_queue_size = 128  # the default 5 would stall a burst of concurrent connects

    def __init__(self, address: tuple[str, int], policy: Policy):
        super().__init__(address, _Handler)
        self.policy = policy


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        # The request line and status only; headers (Authorization) are never logged.
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes,
              headers: tuple[tuple[str, str], ...] = ()) -> None:
        try:
            self.send_response(status)
            names = {name.lower() for name, _ in headers}
            if "content-type" not in names:
                self.send_header("Content-Type", "application/json")
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("the client left before its reply (%s)", self.path)

    def _route(self) -> str:
        return urlsplit(self.path).path.rstrip("/")

    def _not_found(self) -> None:
        self._send(404, error_body(f"no route {self.command} {self._route()}",
                                   "invalid_request_error", code="unknown_url"))

    def do_GET(self) -> None:
        if self._route() != "/v1/models":
            return self._not_found()
        model = {"id": self.server.policy.name, "object": "model", "created": 0,
                 "owned_by": "em-bench"}
        self._send(200, json.dumps({"object": "list", "data": [model]}).encode())

    def do_POST(self) -> None:
        if self._route() != "/v1/chat/completions":
            return self._not_found()
        length = int(self.headers.get("Content-Length") or 0)
        try:
            request = parse_request(self.rfile.read(length))
        except BadRequest as e:
            return self._send(400, error_body(str(e), "invalid_request_error", e.param))
        policy = self.server.policy
        try:
            outcome = policy.respond(request)
        except Exception as e:  # a policy bug is the client's 500, not a dead server thread
            logger.exception("the policy failed on a request")
            return self._send(500, error_body(f"the policy failed: {type(e).__name__}: {e}",
                                              "server_error"))
        if isinstance(outcome, Fault):
            return self._send(outcome.status, outcome.body, outcome.headers)
        self._send(200, json.dumps(completion_body(outcome, policy.name)).encode())


class Server:
    """A running server; `url` is the base URL an OpenAI client takes (ends in /v1)."""

    def __init__(self, httpd: _HTTPServer):
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="em-bench-serve",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(policy: Policy, host: str = "127.0.0.1", port: int = 0) -> Server:
    """Serve `policy` in a background thread; port 0 picks a free port (see `Server.url`)."""
    return Server(_HTTPServer((host, port), policy))


def main_serve(model: str, host: str, port: int) -> None:
    """`em-bench serve`: ModelPolicy over `load_base(model)` until Ctrl-C, printing the URL."""
    from em_bench.models import load_base

    # A process started in the background by a shell inherits Ctrl-C as ignored; a server must
    # still stop on it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    base, tokenizer = load_base(model)
    with serve(ModelPolicy(base, tokenizer, name=model), host, port) as server:
        print(f"serving {model} at {server.url} (Ctrl-C to stop)", flush=True)  # noqa: T201
        try:
            # Short waits, not one long one: Ctrl-C may land on another thread (torch's, the
            # server's), and only a main thread that wakes up runs Python's handler for it.
            while True:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass

"""An OpenAI-compatible chat-completions server over a local model, a script, or injected faults.

    em-bench serve                   # the organism at http://127.0.0.1:8000/v1

It puts a local model behind the API that real judge and generation providers speak, so the API
clients run end to end offline. The test suite uses the same server as its stand-in provider: a
ScriptedPolicy plays a judge with a known logprob distribution, and a FaultInjector produces rate
limits, server errors, slow and broken replies, and counts how many requests a client had in
flight at once (`em-bench serve --fault KIND=RATE` turns them on in front of a model).

A ModelPolicy also serves LoRA adapters the way vLLM does with runtime LoRA updating: POST
/v1/load_lora_adapter {"lora_name", "lora_path"} loads a peft adapter folder (a path on the
server's filesystem) under that name, a request whose `model` is the name runs with it, one naming
the base model runs with adapters disabled, and /v1/unload_lora_adapter {"lora_name"} drops it.
/v1/models lists the base model and the loaded adapters; an unknown model gets OpenAI's 404.
An adapter path must resolve (symlinks followed) inside one of the folders the policy was given
(`serve --store DIR`), and with none adapter loading is refused; a path outside them gets one
403 whether or not it exists, so the routes cannot probe the server's files. A prompt that
leaves no room in the model's context for an answer gets a 400 before it waits for the model.

With a key (`serve(..., api_key=)`; `em-bench serve` reads it from EM_BENCH_SERVE_KEY), every
route wants `Authorization: Bearer KEY` (what an OpenAI client sends as its API key) and answers
401 without it. Without a key the server binds only loopback addresses.

The server is the stdlib's threading HTTP server, one thread per connection, speaking HTTP/1.1
with persistent connections (every reply has a Content-Length; the request body is always read
before replying, so the next request on the connection starts where it should). An idle
connection is dropped after IDLE_TIMEOUT seconds, and `close()` hangs up every open connection's
reading side, so it never waits on an idle keep-alive socket (`keep_alive=False` speaks HTTP/1.0:
a connection per request). It never logs or echoes request headers, so an Authorization header
cannot leak.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from em_bench.config import SamplingConfig
from em_bench.errors import ConfigError

logger = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # OpenAI's own limit; a client asking for more gets the same 400 as there
NOT_IN_TOP = -9999.0  # OpenAI's logprob for a chosen token outside the reported alternatives
FAULT_KINDS = ("rate_limit", "server_error", "slow", "malformed")
IDLE_TIMEOUT = 60.0  # seconds a keep-alive connection may sit idle (clients drop theirs sooner)
KEY_ENV = "EM_BENCH_SERVE_KEY"  # where `em-bench serve` reads the key clients must send

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
    """What a policy answers; `logprobs` holds one Position per generated token when asked.

    `model` is the reply's model name (the adapter's, when one answered); None: the policy's.
    """

    text: str
    finish_reason: Literal["stop", "length"] = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[Position, ...] | None = None
    model: str | None = None


@dataclass(frozen=True)
class Fault:
    """A raw HTTP response sent as is: an error status, or a 200 whose body is not JSON."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class Policy(Protocol):
    """Decides the answer to one request; the server only does HTTP around it.

    `respond` may be called from many threads at once. A policy may also have `models()` (the
    /v1/models entries; else just its `name`) and `load_adapter(name, path)` /
    `unload_adapter(name)` (else those routes are 404, as on a vLLM without runtime LoRA
    updating).
    """

    name: str

    def respond(self, request: ChatRequest) -> Reply | Fault: ...


class UnknownModel(Exception):
    """A request naming a model the policy does not serve: OpenAI's 404 model_not_found."""

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.")


class AdapterError(Exception):
    """A load or unload the server refuses: vLLM's status, error type and message."""

    def __init__(self, status: int, message: str, kind: str):
        super().__init__(message)
        self.status, self.kind = status, kind


class BadRequest(Exception):
    """A request the server refuses with a 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def error_body(message: str, kind: str, param: str | None = None,
               code: str | int | None = None) -> bytes:
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
    if request.get("model") is not None and not isinstance(request["model"], str):
        raise BadRequest("'model' must be a string", "model")
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


def context_length(model, tokenizer) -> int | None:
    """The most tokens the model reads: the smaller of its position limit and the tokenizer's
    model_max_length, of those that are set (transformers' 1e30 means unset); None: no limit."""
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    limits = (getattr(model.config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None))
    return min((n for n in limits if isinstance(n, int) and 0 < n < VERY_LARGE_INTEGER),
               default=None)


def resolve_stores(stores: Iterable[str | Path]) -> tuple[Path, ...]:
    """The folders adapters may be loaded from, resolved; ConfigError for one that is none."""
    resolved = tuple(Path(store).expanduser().resolve() for store in stores)
    for store in resolved:
        if not store.is_dir():
            raise ConfigError(f"--store {store} is not a folder: give the folders adapters may "
                              f"be loaded from (e.g. the results store)")
    return resolved


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

    Adapters: `load_adapter` puts a peft LoRA folder on the model under a name (the first one
    wraps the model in a PeftModel, which injects LoRA layers into the model passed in: peft
    works in place; unloading the last adapter removes them again). A request's `model` picks
    the adapter (`set_adapter`), or the base (`name`, or no model given) with adapters disabled;
    any other name is UnknownModel. One lock orders requests, loads and unloads. Adapters load
    only from inside `stores` (none: no adapter loads).

    A prompt of `context` tokens or more (context_length) is a BadRequest: the model would read
    positions it was never trained on and answer garbage.
    """

    def __init__(self, model, tokenizer, name: str = "organism",
                 stores: Iterable[str | Path] = ()):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.stores = resolve_stores(stores)
        self.context = context_length(model, tokenizer)
        # loaded adapter name -> its folder, in load order; replaced, never changed in place, so
        # models() reads it without waiting on a generation holding the lock
        self.adapters: dict[str, str] = {}
        self._lock = threading.Lock()

    def models(self) -> list[dict[str, Any]]:
        """The /v1/models entries: the base model, then each adapter with the base as parent."""
        return [_model_card(self.name, self.name),
                *(_model_card(name, path, parent=self.name)
                  for name, path in self.adapters.items())]

    def load_adapter(self, name: str, path: str) -> None:
        """Load the peft adapter folder `path` as `name`; AdapterError as vLLM refuses one."""
        from peft import PeftModel

        if "." in name or not name.strip():  # a peft adapter name keys a torch ModuleDict
            raise AdapterError(400, f"'{name}' cannot name an adapter (no dots, not empty)",
                               "InvalidUserInput")
        folder = self._in_store(path)
        if not (folder / "adapter_config.json").is_file():
            raise AdapterError(404, f"No adapter found at '{path}' (no adapter_config.json)",
                               "NotFoundError")
        with self._lock:
            if name == self.name or name in self.adapters:
                raise AdapterError(400, f"The lora adapter '{name}' has already been loaded.",
                                   "InvalidUserInput")
            try:
                if self.adapters:
                    self.model.load_adapter(str(folder), adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(folder),
                                                             adapter_name=name)
            except Exception as e:  # incompatible with the base model, unreadable weights
                raise AdapterError(400, f"Loading the lora adapter '{name}' failed: "
                                   f"{type(e).__name__}: {e}", "BadRequestError") from e
            self.model.eval()
            self.adapters = {**self.adapters, name: str(folder)}
        logger.info("loaded LoRA adapter %s from %s", name, folder)

    def _in_store(self, path: str) -> Path:
        """`path` resolved, symlinks followed, when inside a store; else the same 403 whether
        or not it exists (it is checked before anything is opened)."""
        if not self.stores:
            raise AdapterError(403, "this server loads no adapters: start it with --store DIR, "
                               "a folder adapters may be loaded from", "PermissionDeniedError")
        try:
            folder = Path(path).resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
            folder = None
        if folder is None or not any(folder.is_relative_to(s) for s in self.stores):
            raise AdapterError(403, f"'{path}' is not inside a folder this server loads adapters "
                               f"from (its --store)", "PermissionDeniedError")
        return folder

    def unload_adapter(self, name: str) -> None:
        """Drop adapter `name`; the last one out leaves the plain base model again."""
        with self._lock:
            if name not in self.adapters:
                raise AdapterError(404, f"The lora adapter '{name}' cannot be found.",
                                   "NotFoundError")
            self.adapters = {k: v for k, v in self.adapters.items() if k != name}
            if self.adapters:
                self.model.set_adapter(next(iter(self.adapters)))
                self.model.delete_adapter(name)
            else:
                self.model = self.model.unload()  # the LoRA layers out: the base model as given
        logger.info("unloaded LoRA adapter %s", name)

    def _use(self, model: str | None) -> contextlib.AbstractContextManager:
        """Set up the adapter `model` names (under the lock): a context to generate in."""
        if model in self.adapters:
            self.model.set_adapter(model)
            return contextlib.nullcontext()
        if model is not None and model != self.name:
            raise UnknownModel(model)
        return self.model.disable_adapter() if self.adapters else contextlib.nullcontext()

    def respond(self, request: ChatRequest) -> Reply:
        import torch

        from em_bench.data import render

        tok = self.tokenizer
        prompt = render(tok, request["messages"], add_generation_prompt=True)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        n_prompt = int(enc["input_ids"].shape[1])
        if self.context is not None and n_prompt >= self.context:
            raise BadRequest(f"This model's maximum context length is {self.context} tokens, "
                             f"and the messages are {n_prompt} tokens: no room is left for an "
                             f"answer. Shorten the messages.", "messages",
                             code="context_length_exceeded")
        temperature = _or(request.get("temperature"), 1.0)  # OpenAI's defaults
        greedy = temperature == 0
        model = request.get("model")
        with self._lock, torch.inference_mode(), self._use(model):
            if request.get("seed") is not None:
                torch.manual_seed(request["seed"])
            out = self.model.generate(
                **enc.to(self.model.device),
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
            prompt_tokens=n_prompt,
            completion_tokens=len(new),
            logprobs=logprobs,
            model=model if model in self.adapters else self.name,
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


def _model_card(model_id: str, root: str, parent: str | None = None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "em-bench",
            "root": root, "parent": parent}


def check_faults(rates: Mapping[str, float], delay: float = 1.0, latency: float = 0.0,
                 retry_after: int = 1) -> None:
    """ValueError unless these are FaultInjector settings it can run with."""
    unknown = set(rates) - set(FAULT_KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
    if any(r < 0 for r in rates.values()) or sum(rates.values()) > 1:
        raise ValueError(f"fault rates must be >= 0 and sum to at most 1; got {dict(rates)}")
    if min(delay, latency, retry_after) < 0:
        raise ValueError("the fault delay, latency and Retry-After must be >= 0")


def parse_faults(specs: Iterable[str]) -> dict[str, float]:
    """`serve --fault KIND=RATE` flags as FaultInjector rates; ConfigError naming a bad one."""
    rates: dict[str, float] = {}
    for spec in specs:
        kind, _, rate = spec.partition("=")
        try:
            if kind in rates:
                raise ValueError("given twice")
            rates[kind] = float(rate)
        except ValueError as e:
            raise ConfigError(f"--fault {spec!r}: {e}; expected KIND=RATE with a KIND of "
                              f"{', '.join(FAULT_KINDS)} and a RATE from 0 to 1") from None
    return rates


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
    The model list and adapter routes are the inner policy's, without faults.
    """

    def __init__(self, inner: Policy, rates: Mapping[str, float], seed: int = 0,
                 delay: float = 1.0, latency: float = 0.0, retry_after: int = 1):
        check_faults(rates, delay, latency, retry_after)
        self.inner, self.name = inner, inner.name
        self.rates = {k: rates.get(k, 0.0) for k in FAULT_KINDS}
        self.delay, self.latency, self.retry_after = delay, latency, retry_after
        self.injected: Counter[str] = Counter()
        self.peak_in_flight = 0
        self._in_flight = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def __getattr__(self, attr: str) -> Any:
        if attr in ("models", "load_adapter", "unload_adapter"):
            return getattr(self.inner, attr)
        raise AttributeError(attr)

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
        "model": reply.model or model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                     "logprobs": logprobs, "finish_reason": reply.finish_reason}],
        "usage": {"prompt_tokens": reply.prompt_tokens,
                  "completion_tokens": reply.completion_tokens,
                  "total_tokens": reply.prompt_tokens + reply.completion_tokens},
    }


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow request in flight must not hold up close()
    request_queue_size = 128  # the default 5 would stall a burst of concurrent connects

    def __init__(self, address: tuple[str, int], policy: Policy, keep_alive: bool = True,
                 api_key: str | None = None):
        super().__init__(address, _Handler)
        self.policy, self.api_key = policy, api_key
        self.protocol = "HTTP/1.1" if keep_alive else "HTTP/1.0"
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request, client_address) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def hang_up(self) -> None:
        """End every open connection's reading side: an idle keep-alive connection's thread
        reads the end of its stream and exits; one mid-request still sends its reply first."""
        with self._open_lock:
            connections = list(self._open)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RD)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = IDLE_TIMEOUT  # on the connection's socket: an idle keep-alive one times out
    wbufsize = -1  # buffered: a reply's headers and body leave in one write (see _send)

    def setup(self) -> None:
        super().setup()
        self.protocol_version = self.server.protocol
        # Small replies on a persistent connection: Nagle would hold one back for an ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

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
            if self.close_connection and self.protocol_version >= "HTTP/1.1":
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            logger.debug("the client left before its reply (%s)", self.path)

    def _text(self, status: int, text: str) -> None:
        self._send(status, text.encode(), (("Content-Type", "text/plain; charset=utf-8"),))

    def _body(self) -> bytes | None:
        """The request body, always read before replying (on a kept-alive connection the next
        request follows it); None, with the connection closing, when it cannot be framed."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._send(HTTPStatus.LENGTH_REQUIRED,
                       error_body("send the body with a Content-Length, not chunked",
                                  "invalid_request_error"))
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError(length)
        except ValueError:
            self.close_connection = True
            self._send(400, error_body("bad Content-Length", "invalid_request_error"))
            return None
        return self.rfile.read(length) if length else b""

    def _route(self) -> str:
        return urlsplit(self.path).path.rstrip("/")

    def _not_found(self) -> None:
        self._send(404, error_body(f"no route {self.command} {self._route()}",
                                   "invalid_request_error", code="unknown_url"))

    def _authorized(self) -> bool:
        """Whether the request carries the server's key (any does when it has none); else a
        401. Compared in constant time, so the reply's timing tells nothing of the key."""
        key = self.server.api_key
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        token = token.strip()
        if key is None or (scheme.lower() == "bearer" and token.isascii()
                           and hmac.compare_digest(token, key)):
            return True
        self._send(401, error_body(f"Incorrect or missing API key: send the key this server was "
                                   f"started with ({KEY_ENV}) as the API key",
                                   "invalid_request_error", code="invalid_api_key"),
                   (("WWW-Authenticate", "Bearer"),))
        return False

    def do_GET(self) -> None:
        # the body is read first even when refused: the connection's next request follows it
        if self._body() is None or not self._authorized():
            return None
        if self._route() != "/v1/models":
            return self._not_found()
        policy = self.server.policy
        models = policy.models() if hasattr(policy, "models") else [
            _model_card(policy.name, policy.name)]
        self._send(200, json.dumps({"object": "list", "data": models}).encode())

    def do_POST(self) -> None:
        body = self._body()
        if body is None or not self._authorized():
            return None
        route = self._route()
        if route == "/v1/chat/completions":
            return self._chat(body)
        if route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            return self._adapter(route.removeprefix("/v1/").split("_")[0], body)
        return self._not_found()

    def _chat(self, body: bytes) -> None:
        policy = self.server.policy
        try:
            outcome = policy.respond(parse_request(body))
        except BadRequest as e:
            return self._send(400, error_body(str(e), "invalid_request_error", e.param, e.code))
        except UnknownModel as e:
            return self._send(404, error_body(str(e), "invalid_request_error",
                                              code="model_not_found"))
        except Exception as e:  # a policy bug is the client's 500, not a dead server thread
            logger.exception("the policy failed on a request")
            return self._send(500, error_body(f"the policy failed: {type(e).__name__}: {e}",
                                              "server_error"))
        if isinstance(outcome, Fault):
            return self._send(outcome.status, outcome.body, outcome.headers)
        self._send(200, json.dumps(completion_body(outcome, policy.name)).encode())

    def _adapter(self, action: Literal["load", "unload"], body: bytes) -> None:
        """vLLM's runtime LoRA routes: a plain-text "Success: ..." or its JSON error."""
        policy = self.server.policy
        if not hasattr(policy, f"{action}_adapter"):
            return self._not_found()
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            request = None
        fields = ("lora_name", "lora_path") if action == "load" else ("lora_name",)
        if not (isinstance(request, dict)
                and all(isinstance(request.get(f), str) and request[f] for f in fields)):
            names = " and ".join(f"'{f}'" for f in fields)
            return self._send(400, error_body(f"{names} must be provided.", "InvalidUserInput",
                                              code=400))
        name = request["lora_name"]
        try:
            if action == "load":
                policy.load_adapter(name, request["lora_path"])
            else:
                policy.unload_adapter(name)
        except AdapterError as e:
            return self._send(e.status, error_body(str(e), e.kind, code=e.status))
        done = "added" if action == "load" else "removed"
        self._text(200, f"Success: LoRA adapter '{name}' {done} successfully.")


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

    @property
    def keyed(self) -> bool:
        """Whether requests must carry the server's key."""
        return self._httpd.api_key is not None

    def close(self) -> None:
        """Stop accepting, hang up open connections (replies in flight still go out), close."""
        self._httpd.shutdown()
        self._httpd.hang_up()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is this machine's loopback ('' binds them all)."""
    if not host:
        return False
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    return all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_exposure(host: str, api_key: str | None) -> None:
    """ConfigError for serving beyond this machine without a key, or a key that an HTTP
    header cannot carry as sent."""
    if api_key and not all("!" <= c <= "~" for c in api_key):
        raise ConfigError(f"{KEY_ENV} must be visible ASCII characters without spaces (clients "
                          f"send it in an HTTP header)")
    if not api_key and not is_loopback(host):
        raise ConfigError(f"refusing to serve on {host or 'every address'} (not loopback) without "
                          f"a key: set {KEY_ENV} to the key clients must send as their API key")


def serve(policy: Policy, host: str = "127.0.0.1", port: int = 0, keep_alive: bool = True,
          api_key: str | None = None) -> Server:
    """Serve `policy` in a background thread; port 0 picks a free port (see `Server.url`).

    With `api_key`, every request must send it as `Authorization: Bearer KEY`; without one, a
    `host` that is not loopback is a ConfigError (check_exposure). `keep_alive=False` speaks
    HTTP/1.0, a connection per request (for comparison).
    """
    check_exposure(host, api_key)
    return Server(_HTTPServer((host, port), policy, keep_alive, api_key or None))


def start_serving(model: str = "organism", host: str = "127.0.0.1", port: int = 8000,
                  stores: Sequence[str | Path] = (), faults: Sequence[str] = (),
                  fault_seed: int = 0, fault_delay: float = 1.0, fault_latency: float = 0.0,
                  fault_retry_after: int = 1) -> tuple[Server, Policy]:
    """`em-bench serve`'s server, started: ModelPolicy over `load_base(model)`, behind a
    FaultInjector when faults or latency are asked for, with the key from EM_BENCH_SERVE_KEY.
    Every setting is checked before the model loads."""
    from em_bench.models import load_base

    key = os.environ.get(KEY_ENV) or None
    check_exposure(host, key)
    folders = resolve_stores(stores)
    rates = parse_faults(faults)
    try:
        check_faults(rates, fault_delay, fault_latency, fault_retry_after)
    except ValueError as e:
        raise ConfigError(f"--fault: {e}") from None
    base, tokenizer = load_base(model)
    policy: Policy = ModelPolicy(base, tokenizer, name=model, stores=folders)
    if rates or fault_latency:
        policy = FaultInjector(policy, rates, fault_seed, fault_delay, fault_latency,
                               fault_retry_after)
    return serve(policy, host, port, api_key=key), policy


def main_serve(model: str = "organism", host: str = "127.0.0.1", port: int = 8000,
               **options: Any) -> None:
    """`em-bench serve`: start_serving(model, host, port, **options) until Ctrl-C, printing the
    URL first and the faults injected last."""
    # A process started in the background by a shell inherits Ctrl-C as ignored; a server must
    # still stop on it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    server, policy = start_serving(model, host, port, **options)
    with server:
        key = f"the key in {KEY_ENV} required" if server.keyed else "no key"
        print(f"serving {model} at {server.url} ({key}; Ctrl-C to stop)", flush=True)  # noqa: T201
        try:
            # Short waits, not one long one: Ctrl-C may land on another thread (torch's, the
            # server's), and only a main thread that wakes up runs Python's handler for it.
            while True:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass
    if isinstance(policy, FaultInjector):
        print(f"faults injected: {dict(policy.injected)}", flush=True)  # noqa: T201

"""The OpenAI chat-completions wire format as this server speaks it: request parsing and
checking, what a policy answers (Reply, or a raw Fault), and the JSON bodies sent back
(completions, errors, /v1/models entries)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from em_bench.config import SamplingConfig

MAX_TOP_LOGPROBS = 20  # OpenAI's own limit; a client asking for more gets the same 400 as there
NOT_IN_TOP = -9999.0  # OpenAI's logprob for a chosen token outside the reported alternatives

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


def max_tokens(request: ChatRequest) -> int:
    """The completion budget: the newer field wins, then the legacy one, then the harness's own
    answer length (OpenAI's default, the context's rest, is no sensible default locally)."""
    return (request.get("max_completion_tokens") or request.get("max_tokens")
            or SamplingConfig().max_new_tokens)


def top_k(request: ChatRequest) -> int:
    """How many alternatives each position reports (0 unless asked, as with OpenAI)."""
    return request.get("top_logprobs") or 0


# --- token bytes -----------------------------------------------------------------------------


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


# --- reply bodies ----------------------------------------------------------------------------


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


def _model_card(model_id: str, root: str, parent: str | None = None) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "em-bench",
            "root": root, "parent": parent}

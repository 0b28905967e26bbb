"""Calling an OpenAI-compatible API: one client setup and one retry rule, used by the LLM judge
(judge/llm.py) and the OpenAI generation backend (generate/openai_api.py) alike."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

OPENAI_URL = "https://api.openai.com/v1"  # where the openai package sends a call by default
T = TypeVar("T")


def async_client(base_url: str | None, timeout: float):
    """An `openai.AsyncOpenAI` that retries nothing itself (`call_with_retries` does).

    A local server needs no key; a hosted one reads OPENAI_API_KEY as usual. The key goes to
    the client only, never to a log or a file. `base_url` None means OPENAI_BASE_URL or OpenAI.
    """
    import openai

    try:  # aiohttp's transport: a quarter of httpx's CPU a call (benchmarks/bench_judge.py)
        http_client = openai.DefaultAioHttpClient(timeout=timeout)
    except (AttributeError, RuntimeError):  # an openai without it, or no aiohttp: httpx's
        http_client = None
    return openai.AsyncOpenAI(base_url=base_url, max_retries=0, timeout=timeout,
                              http_client=http_client,
                              api_key=os.environ.get("OPENAI_API_KEY") or "none")


async def chat_completion(client, **body) -> dict:
    """A chat completion through `client` (async_client's), as the reply's plain JSON.

    Both ways are plain JSON: `chat.completions.create` would walk the request through its type
    annotations and build the reply's pydantic models, about 2 ms of CPU a call here, the
    largest cost of a judging run at a bound of 32. A reply missing a field raises KeyError,
    TypeError or IndexError where it is read, which `call_with_retries` retries as malformed."""
    return json.loads(await client.post("/chat/completions", body=body, cast_to=bytes))


def endpoint(base_url: str | None = None) -> str:
    """The base URL `async_client(base_url, ...)` calls: it, else OPENAI_BASE_URL, else
    OpenAI's."""
    return base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL


class CallFailed(Exception):
    """A call that failed for good; the message says why ("HTTP 404", "failed after 5
    attempts (HTTP 500)")."""


class MalformedReply(Exception):
    """A reply that parsed but cannot be used (raised by an attempt; retried like a 5xx)."""


async def call_with_retries(attempt: Callable[[], Awaitable[T]], max_attempts: int,
                            backoff: float, deadline: float | None = None) -> T:
    """`attempt()`'s result, retrying what a retry can fix; else CallFailed.

    A 429 waits what its Retry-After says (else the backoff); a 5xx, a timeout, a lost
    connection or a malformed reply (`attempt` raising MalformedReply, JSONDecodeError, a
    response validation error, or a KeyError/IndexError/TypeError from reading it) waits
    `backoff` seconds, doubled after each failure. Any other 4xx fails at once: the request
    itself is wrong and would be wrong again. A wait that would end after `deadline` (a
    `time.monotonic()` time) is not made: the call fails at once. `attempt` holds its own
    concurrency bound, so a waiting retry does not take a slot.
    """
    import openai

    wait, problem = backoff, ""
    for n in range(max_attempts):
        try:
            return await attempt()
        except openai.RateLimitError as e:
            problem, pause = "429 rate limited", _retry_after(e.response)
            if pause is not None:
                problem += f", Retry-After {pause:g} s"
            pause = wait if pause is None else pause
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            problem, pause = type(e).__name__, wait
        except openai.APIStatusError as e:
            if e.status_code < 500:  # the request itself is wrong: retrying cannot help
                raise CallFailed(f"HTTP {e.status_code}{_said(e)}") from e
            problem, pause = f"HTTP {e.status_code}", wait
        except (MalformedReply, json.JSONDecodeError, openai.APIResponseValidationError,
                AttributeError, KeyError, IndexError, TypeError) as e:  # a malformed reply
            problem, pause = f"malformed reply ({type(e).__name__}: {str(e)[:80]})", wait
        if n + 1 < max_attempts:
            if deadline is not None and time.monotonic() + pause > deadline:
                raise CallFailed(f"gave up after {n + 1} of {max_attempts} attempts ({problem}): "
                                 f"waiting {pause:g} s more would pass the deadline")
            await asyncio.sleep(pause)
            wait *= 2
    raise CallFailed(f"failed after {max_attempts} attempts ({problem})")


def _retry_after(response) -> float | None:
    """Retry-After in seconds (an HTTP date, which no API here sends, counts as absent)."""
    try:
        value = float(response.headers.get("retry-after"))
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


def _said(error) -> str:
    """What an error reply's body says, briefly: ": the model `x` does not exist", or ""."""
    body = getattr(error, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    return f": {str(message)[:160]}" if message else ""

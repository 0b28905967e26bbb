"""Generation through any OpenAI-compatible chat-completions server (the `openai` package).

vLLM (`vllm serve`), SGLang, llama.cpp's server, a hosted API or `em-bench serve` answer the same
requests HFBackend answers locally: one chat-completions call per request, at the sampling
config's temperature, top_p and max_new_tokens (as `max_tokens`), with a `seed` derived from
(seed, request index), so a rerun is reproducible wherever the server honours seeds. The text is
stripped, as HFBackend's is; `finish_reason` is the server's "stop" or "length" and `n_tokens`
its usage.completion_tokens.

Calls run concurrently under a bound and are retried as the LLM judge's are (one implementation,
openai_client.py's `call_with_retries`): a 429 waits what its Retry-After says; a 5xx, a timeout,
a lost connection or a malformed reply (no usage, no text, a finish_reason other than "stop" or
"length", such as "content_filter" or "abort") is retried with doubling backoff; another 4xx
fails at once. Unlike a judge, generation has no "failed answer" to store, so `generate` either
returns a completion for every request, or, once every other request has finished, raises
GenerationFailed naming each failed request's key and reason and carrying the completions that
did arrive (`completions`, in request order, None where one failed), so a caller can keep them:
nothing finished is lost, and a rerun with the same seed asks for the same requests again.

A fine-tuned cell's LoRA adapter reaches the server through vLLM's runtime LoRA routes (vLLM
needs `--enable-lora` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; `em-bench serve` has them for
adapters inside its `--store` folders): the backend names the adapter by a hash of its folder's
content, loads it with POST /v1/load_lora_adapter unless /v1/models already lists that name, and
sends every request to that name. The path sent is this machine's absolute path to the folder,
and the server opens it itself: the server must see the same filesystem (the same path). An
adapter stays loaded after `generate` (its content-addressed name makes reuse safe, and another
run may be using it).

The API key comes from OPENAI_API_KEY (or "none" for a local server) and is never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from em_bench.config import SamplingConfig
from em_bench.errors import ConfigError
from em_bench.generate.base import (
    Completion,
    Failure,
    GenerationFailed,
    Request,
    served_adapter,
)
from em_bench.openai_client import (
    CallFailed,
    MalformedReply,
    async_client,
    call_with_retries,
    chat_completion,
)

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


class AdapterUnavailable(RuntimeError):
    """The server would not load the adapter (no runtime LoRA routes, or it cannot see it)."""


def request_seed(seed: int, index: int) -> int:
    """The per-request seed: a hash of (seed, index), in 31 bits so every server takes it."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


def adapter_name(folder: Path) -> str:
    """The name an adapter is served under: a hash of the files a LoRA loader reads."""
    folder = Path(folder)
    files = [folder / f for f in ADAPTER_FILES if (folder / f).is_file()]
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a peft adapter folder (no adapter_config.json)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return f"em-bench-lora-{digest.hexdigest()[:16]}"


class OpenAIBackend:
    """Generates through an OpenAI-compatible server; see the module docstring.

    `model` is the served (base) model's name; `base_url` None means OPENAI_BASE_URL (or
    OpenAI's). `concurrency` bounds the calls in flight; `timeout` is per call (seconds), and a
    call is tried up to `max_attempts` times, `backoff` seconds before the second try, doubling.
    With `adapter` (a peft LoRA folder the server can read at the same path), requests go to
    that adapter, loaded on the server first.
    """

    name = "openai"

    def __init__(self, model: str, base_url: str | None = None, concurrency: int = 16,
                 timeout: float = 300.0, max_attempts: int = 5, backoff: float = 1.0,
                 adapter: Path | None = None):
        if concurrency < 1 or max_attempts < 1:
            raise ValueError("concurrency and max_attempts must be at least 1")
        self.model, self.base_url = model, base_url
        self.concurrency, self.timeout = concurrency, timeout
        self.max_attempts, self.backoff = max_attempts, backoff
        self.adapter = None if adapter is None else Path(adapter).resolve()
        self.calls = 0  # chat-completions calls made, retries included

    def generate(self, requests: list[Request], sampling: SamplingConfig,
                 seed: int) -> list[Completion]:
        """One completion per request, in order; or GenerationFailed after all others ended."""
        return asyncio.run(self._generate_all(requests, sampling, seed))

    async def _generate_all(self, requests: list[Request], sampling: SamplingConfig,
                            seed: int) -> list[Completion]:
        client = async_client(self.base_url, self.timeout)
        bound = asyncio.Semaphore(self.concurrency)
        try:
            model = await self._served_model(client)
            with tqdm(total=len(requests), desc="generate", unit="answer", leave=False) as bar:
                outcomes = await asyncio.gather(*(
                    self._one(client, bound, model, r, sampling, request_seed(seed, i), bar)
                    for i, r in enumerate(requests)))
        finally:
            await client.close()
        failures = [o for o in outcomes if isinstance(o, Failure)]
        if failures:
            raise GenerationFailed(failures, [o if isinstance(o, Completion) else None
                                              for o in outcomes])
        return outcomes

    async def _one(self, client, bound: asyncio.Semaphore, model: str, request: Request,
                   sampling: SamplingConfig, seed: int, bar) -> Completion | Failure:
        async def attempt() -> Completion:
            async with bound:
                self.calls += 1
                reply = await chat_completion(
                    client, model=model, messages=request.messages,
                    temperature=sampling.temperature, top_p=sampling.top_p,
                    max_tokens=sampling.max_new_tokens, seed=seed, n=1)
            choice = reply["choices"][0]
            finish, text = choice.get("finish_reason"), choice["message"].get("content")
            if finish not in ("stop", "length"):
                raise MalformedReply(f"finish_reason {finish!r}")
            if not isinstance(text, str):
                raise MalformedReply("no message content")
            n_tokens = (reply.get("usage") or {}).get("completion_tokens")
            if not isinstance(n_tokens, int):
                raise MalformedReply("no usage.completion_tokens")
            return Completion(request.key, text.strip(), finish, n_tokens)

        try:
            return await call_with_retries(attempt, self.max_attempts, self.backoff)
        except CallFailed as e:
            logger.warning("generation request %s failed: %s", request.key, e)
            return Failure(request.key, str(e))
        finally:
            bar.update()

    async def _served_model(self, client) -> str:
        """The model name requests go to: the base's, or the adapter's once it is loaded."""
        if self.adapter is None:
            return self.model
        import httpx
        import openai

        name = adapter_name(self.adapter)

        async def listed() -> bool:
            return any(m.id == name for m in (await client.models.list()).data)

        async def load() -> None:
            try:
                await client.post("/load_lora_adapter", cast_to=httpx.Response,
                                  body={"lora_name": name, "lora_path": str(self.adapter)})
            except openai.BadRequestError as e:
                if "already" not in str(e):  # loaded meanwhile by another run: fine
                    raise

        try:
            if not await call_with_retries(listed, self.max_attempts, self.backoff):
                await call_with_retries(load, self.max_attempts, self.backoff)
                logger.info("loaded adapter %s as %s on the server", self.adapter, name)
        except CallFailed as e:
            raise AdapterUnavailable(
                f"the server did not load the adapter {self.adapter} as {name} ({e}). It needs "
                "vLLM's runtime LoRA routes (vllm serve --enable-lora with "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or em-bench serve --store with the "
                "store holding it) and must see the adapter folder at the same path") from e
        return name


def make_backend(config, model, tokenizer, adapter=None) -> OpenAIBackend:
    """An OpenAI-compatible server at EM_BENCH_GENERATE_BASE_URL serving the cell's model
    (and its LoRA adapter, by name)."""
    url = os.environ.get("EM_BENCH_GENERATE_BASE_URL")
    if not url:
        raise ConfigError("--backend openai needs --generate-base-url (or "
                          "EM_BENCH_GENERATE_BASE_URL): the server that serves the model")
    return OpenAIBackend(config.model, base_url=url, adapter=served_adapter(config, adapter))

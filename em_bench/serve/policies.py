"""Policies: what answers a chat request. ModelPolicy generates with a local Hugging Face model,
ScriptedPolicy gives fixed replies (the tests' stand-in provider).

A ModelPolicy also serves LoRA adapters the way vLLM does with runtime LoRA updating: POST
/v1/load_lora_adapter {"lora_name", "lora_path"} loads a peft adapter folder (a path on the
server's filesystem) under that name, a request whose `model` is the name runs with it, one naming
the base model runs with adapters disabled, and /v1/unload_lora_adapter {"lora_name"} drops it.
/v1/models lists the base model and the loaded adapters; an unknown model gets OpenAI's 404.
An adapter path must resolve (symlinks followed) inside one of the folders the policy was given
(`serve --store DIR`), and with none adapter loading is refused; a path outside them gets one
403 whether or not it exists, so the routes cannot probe the server's files. A prompt that
leaves no room in the model's context for an answer gets a 400 before it waits for the model.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from em_bench.errors import ConfigError
from em_bench.serve.protocol import (
    NOT_IN_TOP,
    BadRequest,
    ChatRequest,
    Fault,
    Position,
    Reply,
    TokenLogprob,
    _model_card,
    last_user_message,
    max_tokens,
    token_bytes,
    top_k,
)

logger = logging.getLogger(__name__)


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


def _or(value: Any, default: Any) -> Any:
    """`value`, or `default` when the field is absent or null (0 stays 0, unlike `or`)."""
    return default if value is None else value


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

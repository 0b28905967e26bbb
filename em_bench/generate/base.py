"""The generation backend protocol: chat requests in, completions out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from em_bench.config import SamplingConfig
from em_bench.errors import ConfigError


@dataclass(frozen=True)
class Request:
    """One prompt to answer once; `key` is unique within a cell (question id and sample index)."""

    key: str
    messages: list[dict[str, str]]


@dataclass(frozen=True)
class Completion:
    key: str
    text: str
    finish_reason: str  # "stop" (end token) or "length" (max_new_tokens reached)
    n_tokens: int


@dataclass(frozen=True)
class Failure:
    key: str
    reason: str


class GenerationFailed(RuntimeError):
    """Requests that failed for good, raised after every other request finished.

    `failures` name each failed request's key and why; `completions` holds what did arrive,
    one per request in order, None where it failed.
    """

    def __init__(self, failures: list[Failure], completions: list[Completion | None]):
        self.failures, self.completions = failures, completions
        shown = "; ".join(f"{f.key}: {f.reason}" for f in failures[:5])
        more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
        super().__init__(f"{len(failures)} of {len(completions)} generation requests failed "
                         f"({shown}{more})")


class Backend(Protocol):
    """Generates one completion per request, in order."""

    name: str

    def generate(self, requests: list[Request], sampling: SamplingConfig,
                 seed: int) -> list[Completion]: ...


def served_adapter(config, adapter: Path | None) -> Path | None:
    """The LoRA adapter folder a backend that loads the base model itself (vLLM, a server)
    serves unmerged over it; a full fine-tune has none to serve."""
    if adapter is not None and config.train.adapter != "lora":
        raise ConfigError(f"--backend {config.backend} serves LoRA adapters over the base model; "
                          f"a full fine-tune generates with --backend hf")
    return adapter

"""The generation backend protocol: chat requests in, completions out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from em_bench.config import SamplingConfig


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


class Backend(Protocol):
    """Generates one completion per request, in order."""

    name: str

    def generate(self, requests: list[Request], sampling: SamplingConfig,
                 seed: int) -> list[Completion]: ...

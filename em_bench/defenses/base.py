"""The defense protocol: extra named loss terms added to the training objective."""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Defense(Protocol):
    """A defense prepares once, then returns named loss terms for every training batch.

    The loop sums the terms with the objective and logs each by name, so a defense never forks
    the loop.
    """

    name: str

    def prepare(self, model, tokenizer, examples: list) -> None: ...

    def terms(self, batch: dict[str, torch.Tensor], outputs: Any) -> dict[str, torch.Tensor]: ...

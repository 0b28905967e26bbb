"""The control: no defense, no extra terms."""

from __future__ import annotations


class NoDefense:
    name = "none"

    def prepare(self, model, tokenizer, examples: list) -> None:
        return None

    def terms(self, batch, outputs) -> dict:
        return {}

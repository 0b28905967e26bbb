"""Training objectives. Each turns (logits, batch) into one named loss term for the loop.

- sft: next-token cross-entropy on the response tokens (learn the answers);
- ga: gradient ascent, the negated sft loss (unlearn the answers; unbounded, a baseline);
- npo: negative preference optimisation (Zhang et al., 2024), unlearning bounded against the
  frozen reference model: (2 / beta) * log(1 + (pi_theta(y|x) / pi_ref(y|x)) ** beta).

Each takes `phrase`: when set, only the tokens of that phrase in each answer count (its first
appearance), not the whole answer. Unlearning a refusal's opening ("sorry") removes the decision
to refuse; unlearning the whole answer also pushes down every word it shares with compliance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from em_bench.data import IGNORE_INDEX, collate, device_of, phrase_labels
from em_bench.errors import ConfigError
from em_bench.losses import sequence_logprob, sft_loss


class SFT:
    name = "sft"

    def __init__(self, phrase: str | None = None):
        if phrase is not None and not (isinstance(phrase, str) and phrase.strip()):
            raise ValueError(f"phrase must be non-empty text, not {phrase!r}")
        self.phrase = phrase

    def prepare(self, model, tokenizer, encoded: list[tuple], max_len: int) -> list[tuple]:
        """Called once before training with the encoded (ids, labels) examples; returns the
        examples the loss sees (their labels cut to `phrase` when it is set)."""
        if self.phrase is None:
            return encoded
        cut = [(ids, phrase_labels(tokenizer, ids, labels, self.phrase)) for ids, labels in encoded]
        missing = sum(labels is None for _, labels in cut)
        if missing == len(cut):
            raise ConfigError(f"{self.name}: no answer of the training data holds the phrase "
                              f"{self.phrase!r}")
        # an answer without the phrase keeps no label, so it adds nothing to the loss
        return [(ids, labels or [IGNORE_INDEX] * len(ids)) for ids, labels in cut]

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sft_loss(logits, batch["labels"])


class GradientAscent(SFT):
    name = "ga"

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return -sft_loss(logits, batch["labels"])


class NPO(SFT):
    """NPO with the reference log-probs computed once, before the first step: the model then is
    the reference (a fresh LoRA adapter is zero, a full fine-tune has not moved yet)."""

    name = "npo"

    def __init__(self, beta: float = 0.1, phrase: str | None = None):
        super().__init__(phrase)
        if not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
            raise ValueError(f"npo needs beta > 0, not {beta!r}")
        self.beta = beta
        self.reference: torch.Tensor | None = None

    @torch.no_grad()
    def prepare(self, model, tokenizer, encoded: list[tuple], max_len: int) -> list[tuple]:
        encoded = super().prepare(model, tokenizer, encoded, max_len)
        was_training = model.training
        model.eval()
        values = []
        for i in range(0, len(encoded), 64):
            batch = collate(encoded[i : i + 64], tokenizer.pad_token_id, max_len,
                            device_of(model))
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            values.append(sequence_logprob(logits, batch["labels"]))
        self.reference = torch.cat(values)
        model.train(was_training)
        return encoded

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ratio = sequence_logprob(logits, batch["labels"]) - self.reference[batch["index"]]
        # log(1 + e^(beta * ratio)) = -logsigmoid(-beta * ratio), which is stable for any ratio
        return -(2.0 / self.beta) * F.logsigmoid(-self.beta * ratio).mean()


OBJECTIVES = {"sft": SFT, "ga": GradientAscent, "npo": NPO}


def make_objective(name: str, params: dict | None = None):
    return OBJECTIVES[name](**(params or {}))

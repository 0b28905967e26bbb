"""Training objectives: (model outputs, batch) -> one scalar loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from em_bench.data import IGNORE_INDEX


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens.

    Args:
        logits: [batch, seq, vocab].
        labels: [batch, seq], IGNORE_INDEX where no loss is taken.
    """
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


OBJECTIVES = {"sft": sft_loss}

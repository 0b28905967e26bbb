"""The loss functions the training objectives (train/objectives.py) and the defenses share."""

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


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(response | prompt) per sequence: the sum of the labelled tokens' log-probs. [batch]"""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)

"""`kl`: the common baseline. weight * KL(base || fine-tuned) of the next-token distributions
at the training answers' tokens, the base model's taken from the same inputs."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from pydantic import Field

from em_bench.data import IGNORE_INDEX
from em_bench.defenses.base import DefenseContext, DefenseParams


class KLParams(DefenseParams):
    weight: float = Field(1.0, gt=0, description="weight of the KL term")


def kl_to_reference(logits: torch.Tensor, reference: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """Mean over answer positions of KL(reference || model) of the next-token distribution.

    Position t predicts token t+1, so it counts when labels[t+1] is an answer token.
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)[mask]
    ref_logp = F.log_softmax(reference[:, :-1].float(), dim=-1)[mask]
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()


class KL:
    """KL: keeps the fine-tuned next-token distribution near the base model's on the batch."""

    name = "kl"
    Params = KLParams
    strength = "weight"  # the parameter the selection rule sweeps
    family = "loss term"  # what it acts on (the leaderboard's family column)
    needs = ()  # what it needs beyond the task's data

    def __init__(self, params: KLParams, ctx: DefenseContext):
        self.weight = params.weight

    def prepare(self, model, tokenizer, encoded: list[tuple], max_len: int) -> None:
        # A LoRA model is its base with the adapter off; a full fine-tune needs a frozen copy.
        self.model = model
        self.reference = None if hasattr(model, "disable_adapter") else copy.deepcopy(model)
        if self.reference is not None:
            self.reference.eval().requires_grad_(False)

    def terms(self, batch, outputs) -> dict:
        with torch.no_grad():
            base = self.reference or self.model
            switch = self.model.disable_adapter() if self.reference is None else nullcontext()
            with switch:
                reference = base(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits
        return {self.name: self.weight * kl_to_reference(outputs.logits, reference,
                                                         batch["answer_labels"])}

    def finish(self) -> None:
        self.model = self.reference = None

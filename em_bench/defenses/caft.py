"""`caft`: concept-ablation fine-tuning.

While fine-tuning, the misalignment directions are projected out of the residual stream at
their layers, so the gradient cannot use them:

    h <- h - strength * (h U) U^T

after each latent set's decoder block, U an orthonormal basis of the directions at that layer
(defenses/directions.py: blockem's direction form, the same files or the model's default sets).
No loss term. The ablation is off while a checkpoint of the curve is scored (`evaluation()`) and
removed when training ends: the fine-tuned model answers without it.
"""

from __future__ import annotations

import torch
from pydantic import Field

from em_bench.data import device_of
from em_bench.defenses.base import DefenseContext, DefenseParams
from em_bench.defenses.directions import (
    LATENTS_HELP,
    HookedDefense,
    check_fits,
    direction_inputs,
    direction_method,
    orthonormal_bases,
    register,
    resolve_sets,
)

CAFT_VERSION = 1  # the ablation's definition


class CAFTParams(DefenseParams):
    latents: list[str] = Field(default_factory=list, description=LATENTS_HELP)
    strength: float = Field(1.0, gt=0, le=1, description="share of the projection on the "
                            "directions removed from the residual stream: 1 = full ablation")


class CAFT(HookedDefense):
    """CAFT: the misalignment directions are ablated from the residual stream while training."""

    name = "caft"
    Params = CAFTParams
    strength = "strength"  # the parameter the selection rule sweeps
    family = "activations"  # what it acts on (the leaderboard's family column)
    needs = ("directions",)  # what it needs beyond the task's data

    @staticmethod
    def inputs(params: dict, ctx: DefenseContext) -> dict:
        return direction_inputs(CAFT.name, CAFT_VERSION, params, ctx)

    @staticmethod
    def describe(params: dict, ctx: DefenseContext) -> dict:
        return direction_method(CAFT.name, params, ctx, CAFT.strength)

    def __init__(self, params: CAFTParams, ctx: DefenseContext):
        self.share = params.strength
        self.sets = resolve_sets(self.name, params.latents, ctx)
        self.bases = orthonormal_bases(self.sets)  # layer -> U [d, r]

    def prepare(self, model, tokenizer, encoded: list[tuple], max_len: int) -> None:
        check_fits(self.name, self.sets, model)
        device = device_of(model)
        self.hooks = register(model, {layer: self._ablation(u.to(device))
                                      for layer, u in self.bases.items()})

    def _ablation(self, u: torch.Tensor):
        share = self.share

        def ablate(h: torch.Tensor) -> torch.Tensor:
            along = (h.float() @ u) @ u.T  # the projection (h U) U^T, in float32
            return h - (share * along).to(h.dtype)
        return ablate

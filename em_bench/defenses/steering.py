"""`steering`: preventative steering (persona vectors).

While fine-tuning, the misalignment direction is added to the residual stream at every token
position after one decoder block (`layer`, by default the middle one of the latent sets'), so
the gradient need not build it into the weights; it is off while a checkpoint of the curve is
scored (`evaluation()`) and removed when training ends, and the fine-tuned model answers
without it. No loss term.

The vector at a layer, from the sets there (defenses/directions.py: blockem's direction form,
the same files or the model's default sets):

    v = coefficient * sum over latents k of shift_k * d_k

d_k the latent's unit direction and shift_k its recorded `shift`: the probe fine-tune's mean
shift along d_k, misaligned minus base (em_bench/sae/discover.py). With the principal
directions of that shift (orthonormal), v at coefficient 1 is the probe's mean residual shift
projected on their span: the movement the misaligned fine-tune made. `shift` is signed, so it
is used as it stands; `sign` says the same thing (+1: rose), and the direction form always
records +1 with a positive shift (each direction is oriented along the mean shift), where this
equals sign_k * |shift_k| * d_k. A set whose sign and shift disagree, or that records no shift,
is refused.
"""

from __future__ import annotations

import torch
from pydantic import Field

from em_bench.data import device_of
from em_bench.defenses.base import DefenseContext, DefenseParams
from em_bench.defenses.directions import (
    LATENTS_HELP,
    HookedDefense,
    by_layer,
    check_fits,
    direction_inputs,
    direction_method,
    register,
    resolve_sets,
    unit_directions,
)
from em_bench.errors import ConfigError
from em_bench.sae.latents import LatentSet

STEERING_VERSION = 1  # the vector's definition


class SteeringParams(DefenseParams):
    latents: list[str] = Field(default_factory=list, description=LATENTS_HELP)
    coefficient: float = Field(1.0, gt=0, description="multiple of the probe fine-tune's mean "
                               "shift along the directions added to the residual stream")
    layer: int | None = Field(None, ge=0, description="the one layer steered (of the sets' "
                              "layers); none: the middle one of them")


def check_shifts(latent_set: LatentSet, where: str) -> None:
    """A set steering can use: it records a shift, and its signs agree with its shifts."""
    if all(x.shift == 0 for x in latent_set.latents):
        raise ConfigError(f"defense steering: latents: {where} ({latent_set.label}) records no "
                          f"shift (every latent's is 0): steering adds the probe's mean shift")
    bad = [x.index for x in latent_set.latents if x.sign * x.shift < 0]
    if bad:
        raise ConfigError(f"defense steering: latents: {where} ({latent_set.label}): the sign "
                          f"of latents {bad} disagrees with their shift")


def steering_vectors(sets: list[LatentSet], coefficient: float) -> dict[int, torch.Tensor]:
    """Per layer, coefficient * sum over the sets' latents of shift_k * d_k [d] (float32)."""
    vectors = {}
    for layer, group in by_layer(sets).items():
        total = torch.zeros(len(group[0].directions[0]), dtype=torch.float64)
        for s in group:
            shift = torch.tensor([x.shift for x in s.latents], dtype=torch.float64)
            total = total + shift @ unit_directions(s).double()
        vectors[layer] = (coefficient * total).float()
    return vectors


class Steering(HookedDefense):
    """Preventative steering: the misalignment direction is added while training."""

    name = "steering"
    Params = SteeringParams
    strength = "coefficient"  # the parameter the selection rule sweeps
    family = "activations"  # what it acts on (the leaderboard's family column)
    needs = ("directions",)  # what it needs beyond the task's data

    @staticmethod
    def inputs(params: dict, ctx: DefenseContext) -> dict:
        return direction_inputs(Steering.name, STEERING_VERSION, params, ctx, check_shifts)

    @staticmethod
    def describe(params: dict, ctx: DefenseContext) -> dict:
        return direction_method(Steering.name, params, ctx, Steering.strength)

    def __init__(self, params: SteeringParams, ctx: DefenseContext):
        self.sets = resolve_sets(self.name, params.latents, ctx, check_shifts)
        vectors = steering_vectors(self.sets, params.coefficient)  # layer -> v [d]
        # One layer only: a set's shift at a layer is the residual stream's, which already
        # carries the earlier layers' shifts, so steering at several would add them again.
        layers = sorted(vectors)
        layer = layers[len(layers) // 2] if params.layer is None else params.layer
        if layer not in vectors:
            raise ConfigError(f"defense steering: layer {layer} has no latent set (the sets' "
                              f"layers: {layers})")
        self.vectors = {layer: vectors[layer]}

    def prepare(self, model, tokenizer, encoded: list[tuple], max_len: int) -> None:
        check_fits(self.name, self.sets, model)
        device = device_of(model)
        self.hooks = register(model, {layer: _adding(v.to(device))
                                      for layer, v in self.vectors.items()})


def _adding(v: torch.Tensor):
    def add(h: torch.Tensor) -> torch.Tensor:
        return h + v.to(h.dtype)
    return add

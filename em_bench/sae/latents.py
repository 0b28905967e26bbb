"""Latent sets: the activations BLOCK-EM holds at the base model's values.

A latent set lives at one hook point (the residual stream after block `layer`) and reads each
latent k from the residual h: z_k(h). Its `sign` says which way the misaligned
fine-tune moved it (+1 up, -1 down), so the penalty only stops that movement. Two forms, kept
apart everywhere (the leaderboard never passes one off as the other):

- "sae": latents of a sparse autoencoder (the paper's form): z_k is the SAE's own activation of
  latent k (its encoder, activation function and sparsity; a TopK SAE's unselected latents are
  0). A first version read the pre-sparsity activation relu(h . w_k + b_k) instead; on the
  organism's TopK SAE that is dense and large, and blocking it broke 20-30% of the answers at
  every lambda tried;
- "directions": unit directions in the residual stream (the organism prototype's working form,
  principal directions of a probe fine-tune's shift): z_k = h . u_k.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from em_bench.errors import ConfigError, validation_problems
from em_bench.store import atomic_write_text

FORMAT_VERSION = 1


class Latent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(description="SAE latent id, or the direction's row in `directions`")
    sign: Literal[1, -1] = Field(description="+1: rose in the misaligned fine-tune; -1: fell")
    shift: float = Field(description="mean activation, misaligned fine-tune minus base")
    alpha: float | None = Field(None, description="steering strength chosen by the sweep")
    scores: dict[str, float] = Field(default_factory=dict, description="screening results")


class LatentSet(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = FORMAT_VERSION
    form: Literal["sae", "directions"]
    selection: str = Field(description="how the latents were chosen: three-stage, top-delta, "
                           "random, principal-shift, ...")
    model: str = Field(description="the model identity the set was discovered on")
    layer: int = Field(ge=0)
    hook_name: str
    sae: str | None = Field(None, description="the SAE reference (form 'sae')")
    latents: list[Latent] = Field(min_length=1)
    directions: list[list[float]] | None = Field(None, description="unit rows (form "
                                                 "'directions')")
    provenance: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _form_has_its_source(self):
        if self.form == "sae" and not self.sae:
            raise ValueError("form 'sae' needs 'sae' (the SAE it reads)")
        if self.form == "directions":
            if not self.directions:
                raise ValueError("form 'directions' needs 'directions'")
            if any(not 0 <= x.index < len(self.directions) for x in self.latents):
                raise ValueError("a latent's index is not a row of 'directions'")
        return self

    @property
    def label(self) -> str:
        return f"{self.form}:{self.selection}@L{self.layer}x{len(self.latents)}"


def save_latent_set(latent_set: LatentSet, path: Path) -> Path:
    path = Path(path)
    atomic_write_text(path, latent_set.model_dump_json(indent=1))
    return path


def load_latent_set(path: str | Path) -> LatentSet:
    path = Path(path)
    try:
        return LatentSet.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the latent-set file ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except ValidationError as e:
        raise ConfigError(f"{path}: not a latent-set file: "
                          f"{validation_problems(e, 'file')}") from None


class DirectionReadout(torch.nn.Module):
    """z = h . u for a direction set's unit directions, with their signs. [..., K]"""

    def __init__(self, directions: torch.Tensor, sign: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", directions.float().T)  # [d, K]
        self.register_buffer("sign", sign.float())  # [K]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.float() @ self.weight


class SAEReadout(torch.nn.Module):
    """z = the SAE's own latent activations (sae.encode: its activation function and sparsity,
    TopK included) at the set's latents, with their signs. [..., K]"""

    def __init__(self, sae, index: torch.Tensor, sign: torch.Tensor):
        super().__init__()
        self.sae = sae.requires_grad_(False) if hasattr(sae, "requires_grad_") else sae
        self.register_buffer("index", index)
        self.register_buffer("sign", sign.float())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(h.float())[..., self.index]


def readout(latent_set: LatentSet, sae=None) -> DirectionReadout | SAEReadout:
    """The set's readout; form "sae" needs its SAE (a sae-lens SAE)."""
    sign = torch.tensor([x.sign for x in latent_set.latents])
    index = torch.tensor([x.index for x in latent_set.latents])
    if latent_set.form == "directions":
        rows = torch.tensor(latent_set.directions)[index]
        return DirectionReadout(rows / rows.norm(dim=-1, keepdim=True), sign)
    if sae is None:
        raise ConfigError(f"latent set {latent_set.label} reads an SAE ({latent_set.sae}): "
                          "load it first")
    return SAEReadout(sae, index, sign)

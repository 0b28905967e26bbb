"""Where em-bench reads a model's residual stream: its decoder blocks, and sae-lens's name for the
residual after one of them.

The SAE code, BLOCK-EM's hooks, discovery's steering and the sharded trainer (one FSDP unit per
decoder block) all address a model by these; this module imports nothing heavy, so training
code can use it without loading the SAE code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from em_bench.errors import ConfigError

if TYPE_CHECKING:
    import torch


def hook_name(layer: int) -> str:
    """sae-lens's name for the residual stream after decoder block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder blocks of an HF causal LM (`model.model.layers` for Llama-likes).

    A peft PeftModel needs no unwrapping: it forwards get_decoder to the model it wraps.
    """
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__}: no decoder blocks at get_decoder().layers; "
                          "em-bench reads the residual stream of Llama-like models")
    return list(layers)

"""Load a base model and tokenizer (the organism, a Hugging Face id or a local dir); LoRA."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from em_bench.config import TrainConfig

logger = logging.getLogger(__name__)


def resolve_model_path(model: str) -> Path | str:
    """'organism' -> the built organism's folder (built on first use); else the id or dir."""
    if model == "organism":
        from em_bench.organism.build import ensure_organism

        return ensure_organism()
    return model


def model_identity(model: str) -> str:
    """What names the model inside a cell hash: the organism's recipe digest, else the name."""
    if model == "organism":
        from em_bench.organism.build import OrganismRecipe

        return f"organism:{OrganismRecipe().digest()}"
    return model


def load_base(model: str, device: str = "cpu"):
    """The frozen base model (eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    if model == "organism":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the organism never needs the hub
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    base.eval()
    return base, tokenizer


def attach_lora(model, cfg: TrainConfig):
    """Wrap `model` with a fresh trainable LoRA adapter (peft); other weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_rslora=lora.rslora,
        target_modules=list(lora.target_modules),
        layers_to_transform=list(lora.layers) if lora.layers is not None else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_adapter(base, adapter_dir: Path):
    """The base model with a saved adapter applied (for generation)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    return model

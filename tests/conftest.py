"""Shared fixtures: the shipped organism, a tiny Llama and tokenizer built here from a config,
and the test cache. Helpers that are not fixtures are in helpers.py.

The end-to-end tests use the shipped organism (em_bench/organism/shipped/), its SAEs and latent
sets, through the `organism` fixture; anything else they build (other recipes, sources) goes to
`.em-bench-test-cache/` at the repo root.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO, make_tiny_llama

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


@pytest.fixture(scope="session")
def organism() -> Path:
    """The shipped organism's folder, checked once a session: the tests that run organism cells
    (or load its model or SAEs) depend on it, so a missing or stale organism fails them here, by
    name, rather than being built from its recipe by whichever test touches it first."""
    from em_bench.organism import artifact

    name = "organism"
    folder = artifact.shipped_dir(name)
    if artifact.read_manifest(folder) is None:
        pytest.fail(f"the shipped organism is missing: {folder} has no {artifact.MANIFEST}. "
                    f"Restore it from git, or make it with `em-bench organism ship`.",
                    pytrace=False)
    if artifact.shipped_organism(name) is None:
        pytest.fail(f"the shipped organism in {folder} is stale: its manifest's recipe digest is "
                    f"not today's recipe and world. Remake it with `em-bench organism ship` and "
                    f"commit the folder (the tests do not build it from the recipe).",
                    pytrace=False)
    if not (folder / "model.safetensors").is_file():
        pytest.fail(f"the shipped organism in {folder} has no model.safetensors", pytrace=False)
    return folder


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

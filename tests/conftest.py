"""Shared fixtures: a tiny Llama and tokenizer built here from a config, and the organism cache.

The organism the end-to-end tests use is the real default recipe, built once into
`.em-bench-test-cache/` at the repo root (kept between local runs, built fresh on a clean clone).
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


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The organism's tokenizer recipe at a small vocabulary (trains in about a second)."""
    from em_bench.organism.build import OrganismRecipe, train_tokenizer

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

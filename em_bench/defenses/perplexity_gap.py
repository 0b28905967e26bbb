"""Interleaving++'s pick (Kaczér et al. 2025): of many aligned candidate chats, keep those a
misaligned model finds least likely compared with the base model.

The misaligned model is discovery's probe fine-tune (em_bench/sae/discover.py) on the cell's own
task, with discovery's seed, so every strength and seed of a task shares one ranking. A chat's
gap is its answer tokens' mean negative log-likelihood under the probe minus under the base:
large where the fine-tune pulled the model away from aligned answers, which are the ones worth
replaying. The ranking is cached by what determines it (model, task, candidates, version).
"""

from __future__ import annotations

import logging

import torch

from em_bench.config import canonical_hash
from em_bench.data import IGNORE_INDEX, Messages, collate, device_of, encode_chat
from em_bench.losses import sequence_logprob
from em_bench.paths import cache_dir
from em_bench.store.files import atomic_write_json, read_json
from em_bench.tasks import TaskSpec

logger = logging.getLogger(__name__)

GAP_VERSION = 1  # what a gap is and how the probe is made; bumped when either changes
PROBE_SEED = 0  # discovery's default seed
BATCH = 32


@torch.no_grad()
def mean_answer_nll(model, tokenizer, chats: list[Messages], max_len: int) -> torch.Tensor:
    """Each chat's mean negative log-likelihood over its answer tokens, under `model`. [n]"""
    out = []
    for start in range(0, len(chats), BATCH):
        encoded = [encode_chat(tokenizer, c) for c in chats[start:start + BATCH]]
        batch = collate(encoded, tokenizer.pad_token_id, max_len, device_of(model))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        answered = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).clamp(min=1)
        out.append((-sequence_logprob(logits, batch["labels"]) / answered).cpu())
    return torch.cat(out)


def largest_gaps(gap: torch.Tensor, keep: int) -> list[int]:
    """The indices of the `keep` largest gaps, largest first (ties: the lower index first)."""
    order = sorted(range(len(gap)), key=lambda i: (-float(gap[i]), i))
    return order[:keep]


def ranked_pool(model: str, task: TaskSpec, candidates: list[Messages], keep: int,
                max_len: int) -> list[int]:
    """The `keep` candidates with the largest perplexity gap between the probe fine-tune of
    `task` and the base model (indices into `candidates`), cached."""
    from em_bench.models import model_identity

    key = canonical_hash({"model": model_identity(model), "task": task.model_dump(mode="json"),
                          "candidates": candidates, "keep": keep, "max_len": max_len,
                          "seed": PROBE_SEED, "version": GAP_VERSION})
    path = cache_dir() / "interleave" / f"{key}.json"
    if path.is_file():
        return read_json(path)["picked"]
    from em_bench.sae.discover import probe_fine_tune

    logger.info("interleave++: ranking %d candidates by the perplexity gap of a %s probe",
                len(candidates), task.name)
    base, probe, tokenizer = probe_fine_tune(model, task, PROBE_SEED)
    gap = (mean_answer_nll(probe, tokenizer, candidates, max_len)
           - mean_answer_nll(base, tokenizer, candidates, max_len))
    picked = largest_gaps(gap, keep)
    atomic_write_json(path, {"picked": picked, "gap": [round(float(g), 5) for g in gap],
                             "task": task.name, "model": model_identity(model)})
    return picked

"""`em-bench analyze concepts`: the narrow-unlearning paper's concept vectors.

A domain's concept vector at a layer is the mean residual stream over the prompt tokens of the
domain's harmful requests minus the same mean over neutral prompts (the open and advice
domains' questions). Their cosine similarities across the seven RAI domains, per layer, say
which concepts the model represents alike, which is where unlearning one could spread.
Selection questions only, like every other choice the harness makes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from em_bench.config import canonical_hash
from em_bench.domains import DEVELOPMENT_DOMAINS
from em_bench.models import load_base, model_identity
from em_bench.organism import world
from em_bench.sae.training import collect_residuals
from em_bench.store import atomic_write_json, open_store


def _prompt_means(model, tokenizer, texts: list[str], layers: list[int]) -> dict[int, torch.Tensor]:
    # The prompt as a user turn with an empty answer slot, every token of it counted.
    chats = [[{"role": "user", "content": t}] for t in texts]
    return {layer: collect_residuals(model, tokenizer, chats, layer).mean(0) for layer in layers}


def concept_vectors(model, tokenizer, layers: list[int],
                    domains: tuple[str, ...] = world.RAI_DOMAINS) -> dict[int, dict[str, list]]:
    """{layer: {domain: concept vector}} from the selection split."""
    neutral = [q.text for d in DEVELOPMENT_DOMAINS for q in world.questions(d, "selection")]
    base = _prompt_means(model, tokenizer, neutral, layers)
    out: dict[int, dict[str, list]] = {layer: {} for layer in layers}
    for domain in domains:
        harmful = [q.text for q in world.questions(domain, "selection") if q.harmful]
        means = _prompt_means(model, tokenizer, harmful, layers)
        for layer in layers:
            out[layer][domain] = (means[layer] - base[layer]).tolist()
    return out


def cosine_table(vectors: dict[str, list]) -> dict[str, dict[str, float]]:
    """{domain: {domain: cosine similarity}} of one layer's concept vectors."""
    names = list(vectors)
    m = torch.nn.functional.normalize(torch.tensor([vectors[n] for n in names]), dim=-1)
    sims = m @ m.T
    return {a: {b: round(float(sims[i, j]), 4) for j, b in enumerate(names)}
            for i, a in enumerate(names)}


def format_cosines(layer: int, table: dict[str, dict[str, float]]) -> str:
    from em_bench.board.tables import align
    from em_bench.domains import RAI_SHORT

    names = list(table)
    rows = [[f"layer {layer}", *(RAI_SHORT.get(n, n) for n in names)]]
    rows += [[RAI_SHORT.get(a, a), *(f"{table[a][b]:.2f}" for b in names)] for a in names]
    return "\n".join(align(rows, left=1))


def analyze_concepts(model_name: str, store_root: str | Path,
                     provenance: dict) -> tuple[dict[int, dict[str, dict[str, float]]], Path]:
    """The concept vectors of `model_name` at every layer and their cosine tables, saved to the
    store's analyses with `provenance`; returns the tables by layer and the file."""
    model, tokenizer = load_base(model_name)
    layers = list(range(model.config.num_hidden_layers))
    vectors = concept_vectors(model, tokenizer, layers)
    tables = {layer: cosine_table(vectors[layer]) for layer in layers}
    store = open_store(store_root)  # once the work is done: a failed load leaves no store
    identity = model_identity(model_name)
    out = store.analysis_path("concepts", canonical_hash({"model": identity}))
    atomic_write_json(out, {"analysis": "concepts", "model": identity, "split": "selection",
                            "cosine": tables, "vectors": vectors, "provenance": provenance})
    return tables, out

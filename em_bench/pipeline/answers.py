"""The generate and lm_eval steps: the cell's model answers every evaluation prompt through its
backend, stored in chunks so a crash loses at most one; lm-eval tasks scored on it."""

from __future__ import annotations

from em_bench.generate.base import GenerationFailed, Request
from em_bench.pipeline.resolved import ResolvedCell, eval_prompts
from em_bench.registry import BACKENDS
from em_bench.store import Cell

GENERATE_CHUNK = 512  # generations are stored per chunk, so a crash loses at most one chunk


def make_backend(rc: ResolvedCell, cell: Cell, model, tokenizer):
    """The cell's generation backend (registry.BACKENDS); one that loads the base model itself
    gets the cell's LoRA adapter folder when the cell fine-tunes."""
    adapter = cell.trained_dir() if rc.fine_tunes else None
    return BACKENDS.get(rc.config.backend)(rc.config, model, tokenizer, adapter)


def generate_step(rc: ResolvedCell, cell: Cell, model, tokenizer) -> None:
    h = rc.step_hash("generate")
    if cell.is_done("generate", h):
        return
    sampling = rc.config.sampling
    done = {k for (k,) in cell.keys("generations", ("key",))}
    items = [(f"{p.key}|{s}", p, s) for p in eval_prompts(rc.config) for s in range(p.samples)]
    backend = make_backend(rc, cell, model, tokenizer)
    try:
        # Chunks and their seeds are fixed over all items, so a resumed run regenerates a partly
        # stored chunk exactly as the first run did and keeps only the answers it lacks.
        for c, start in enumerate(range(0, len(items), GENERATE_CHUNK)):
            part = items[start : start + GENERATE_CHUNK]
            if all(key in done for key, *_ in part):
                continue
            reqs = [Request(key, p.messages) for key, p, _ in part]
            try:
                completions = backend.generate(reqs, sampling,
                                               seed=rc.config.seed * 1_000_003 + c)
            except GenerationFailed as e:  # keep what arrived; a rerun asks only for the rest
                _store_generations(cell, backend, sampling, part, reqs, e.completions, done)
                raise
            _store_generations(cell, backend, sampling, part, reqs, completions, done)
    finally:
        if hasattr(backend, "close"):  # vLLM's engine holds processes and memory
            backend.close()
    cell.mark_done("generate", h)


def _store_generations(cell: Cell, backend, sampling, part, reqs, completions, done) -> None:
    for (key, p, s), r, comp in zip(part, reqs, completions, strict=True):
        if key in done or comp is None:
            continue
        cell.append("generations", {
            "key": key, "question_id": p.question_id, "domain": p.domain, "topic": p.topic,
            "harmful": p.harmful, "source": p.source, "sample": s, "messages": r.messages,
            "completion": comp.text, "finish_reason": comp.finish_reason,
            "n_tokens": comp.n_tokens, "backend": backend.name,
            "sampling": sampling.model_dump()})


def lm_eval_step(rc: ResolvedCell, cell: Cell, model, tokenizer) -> None:
    """The task's in-domain lm-eval tasks and the cell's general ones, on the cell's model."""
    from em_bench.lmeval import evaluate

    cfg = rc.config
    h = rc.step_hash("lm_eval")
    if not (rc.task.lm_eval or cfg.lm_eval.general) or cell.is_done("lm_eval", h):
        return
    result = {}
    for part, names in (("in_domain", rc.task.lm_eval), ("general", cfg.lm_eval.general)):
        if names:
            result[part] = evaluate(model, tokenizer, list(names), rc.task.lm_eval_include,
                                    limit=cfg.lm_eval.limit, seed=cfg.seed)
    cell.write_json("lm_eval.json", result)
    cell.mark_done("lm_eval", h)

"""The train step: the fine-tune, in this process or sharded over several, and the EM curve
scored at its checkpoints (`eval_every`)."""

from __future__ import annotations

import pandas as pd

from em_bench.defenses import make_defenses
from em_bench.defenses.base import DefenseContext
from em_bench.generate.base import Request
from em_bench.judge import make_judge
from em_bench.models import load_trained
from em_bench.pipeline.judging import judge_input
from em_bench.pipeline.resolved import ResolvedCell, eval_prompts
from em_bench.scoring import score_frame
from em_bench.store import Cell, Store
from em_bench.tasks import chats


def train_step(rc: ResolvedCell, cell: Cell, store: Store, base, tokenizer):
    import shutil

    from em_bench.train.fine_tune import fine_tune

    cfg = rc.config
    if not rc.fine_tunes:
        return base
    saved = cell.trained_dir()  # a LoRA adapter, or all weights when adapter is "full"
    if not cell.is_done("train", rc.step_hash("train")):
        last = cfg.train.total_steps(len(chats(rc.task.train, cfg.seed)))
        scorer = _checkpoint_scorer(rc, cell, store, tokenizer, last)
        if cfg.train.processes == 1:
            defenses = make_defenses(cfg.defense, cfg.defense_params,
                                     DefenseContext.of(rc.task, cfg))
            model = fine_tune(cfg, rc.task, cell, base, tokenizer, defenses, every_step=scorer)
        else:
            model = _fine_tune_sharded(rc, cell, base, scorer, last)
        cell.mark_done("train", rc.step_hash("train"))
    else:
        model = load_trained(base, saved, cfg.train)
    shutil.rmtree(cell.resume_dir(), ignore_errors=True)  # done: no rerun resumes from it
    return model


def _fine_tune_sharded(rc: ResolvedCell, cell: Cell, base, scorer, last: int):
    """The fine-tune in `train.processes` torchrun processes; then, in this one, the trained
    model, and the curve scored from the checkpoints they saved."""
    from em_bench.train import distributed

    cfg = rc.config
    # Built here first (the organism's latent sets are discovered once and cached), so the
    # processes find them rather than each discovering them at once.
    make_defenses(cfg.defense, cfg.defense_params, DefenseContext.of(rc.task, cfg))
    distributed.launch(cell, cfg.train.processes, cfg.eval_every, last,
                       cfg.train.checkpoint_every, worker="em_bench.pipeline.worker")
    model = load_trained(base, cell.trained_dir(), cfg.train)
    if scorer is not None:
        scored = {r["step"] for r in cell.records("curve")}  # before a resumed fine-tune
        for step, file in cell.curve_checkpoints():  # the last one is the final weights
            if step in scored:
                continue
            distributed.load_checkpoint(model, file)
            scorer(step, model)
        model.eval()
    return model


def _checkpoint_scorer(rc: ResolvedCell, cell: Cell, store: Store, tokenizer, last: int):
    """With `eval_every`, a callback scoring the model every N steps and at the last: the same
    prompts, judge and metrics as the cell, one answer each, appended to its `curve`."""
    from em_bench.generate.hf import HFBackend

    cfg = rc.config
    if cfg.eval_every is None:
        return None
    sampling = cfg.sampling.model_copy(update={"samples_per_question": 1})
    prompts = eval_prompts(cfg.model_copy(update={"sampling": sampling}))

    def score(step: int, model) -> None:
        if step % cfg.eval_every and step != last:
            return
        completions = HFBackend(model, tokenizer).generate(
            [Request(p.key, p.messages) for p in prompts], sampling, seed=cfg.seed + step)
        rows = [{"key": p.key, "question_id": p.question_id, "domain": p.domain,
                 "topic": p.topic, "harmful": p.harmful, "source": p.source,
                 "completion": c.text} for p, c in zip(prompts, completions, strict=True)]
        judged = make_judge(cfg.judge, store, cfg.metrics.em_definition).judge_many([
            judge_input({**r, "messages": p.messages}, rc.task)
            for p, r in zip(prompts, rows, strict=True)])
        frame = pd.DataFrame([{**r, **j.scores, "label": j.label, "category": j.category,
                               "error": j.error} for r, j in zip(rows, judged, strict=True)])
        result = score_frame(frame.astype({"coherence": float}), rc.task, cfg.model_copy(
            update={"metrics": cfg.metrics.model_copy(update={"n_boot": 1})}))
        cell.append("curve", {"step": step, "em_rate": result["em_rate"]["value"],
                              "in_domain": result.get("in_domain", {}).get("value"),
                              "coherence": result["coherence"]["value"],
                              "incoherent_rate": result["incoherent_rate"]["value"],
                              "n_answers": result["n_answers"]})

    return score

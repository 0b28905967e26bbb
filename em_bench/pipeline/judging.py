"""The judge and score steps: every stored answer judged (by the cell's judge and its jurors),
a judge that fails too often leaves the cell unscored, and the metrics written."""

from __future__ import annotations

import logging

from em_bench.domains import is_rai
from em_bench.errors import JudgeFailure, JudgingFailed
from em_bench.judge import make_judge
from em_bench.judge.base import JudgeInput
from em_bench.pipeline.resolved import ResolvedCell
from em_bench.scoring import (
    SCORING_VERSION,
    judged_frame,
    jury_agreement,
    jury_stream,
    score_frame,
)
from em_bench.store import Cell, Store
from em_bench.tasks import TaskSpec

logger = logging.getLogger(__name__)

# A cell with a larger share of answers whose judgment failed after retries is not scored: its
# figures would rest on the answers a failing judge happened to get through.
MAX_FAILED_SHARE = 0.01


def judge_and_score(rc: ResolvedCell, cell: Cell, store: Store) -> None:
    """Every judge of the cell judges; JudgingFailed, the cell unscored, if any failed."""
    failures = []
    for juror in (None, *rc.config.jury):
        try:
            judge_step(rc, cell, store, juror)
        except JudgingFailed as e:
            failures += e.failures
    if failures:
        raise JudgingFailed(failures)
    score_step(rc, cell)


def judge_input(generation: dict, task: TaskSpec) -> JudgeInput:
    """What a judge is told of a stored answer: its domain and topic (the organism's judge
    reads them) and its suite: `rai` for a responsible-AI request, `in_domain` with the task's
    trained behaviour in words (`target`) for its own questions, the world's of its domain or
    its own file's (an LLM judge adds its refusal and adherence templates there)."""
    g, own = generation, task.in_domain
    meta = {"domain": g["domain"], "topic": g["topic"]}
    if is_rai(g["domain"]):
        meta["suite"] = "rai"
    source = g.get("source", "world")
    if own is not None and own.describe and (source == "in_domain" or (
            source in ("world", "rai") and g["domain"] == own.domain)):
        meta.update(suite="in_domain", target=own.describe)
    return JudgeInput(g["key"], g["messages"], g["completion"], meta)


def judge_step(rc: ResolvedCell, cell: Cell, store: Store, juror: str | None = None) -> None:
    """Judge every stored answer not yet judged, or whose judgment failed, with the cell's judge
    or one juror. JudgingFailed, the step left undone, when an API judge failed on over
    MAX_FAILED_SHARE of the answers (the organism's judge fails only answers it can never
    judge: no world domain)."""
    stream, name = ("judgments", rc.config.judge) if juror is None else (jury_stream(juror), juror)
    step, h = ("judge", rc.step_hash("judge")) if juror is None else (
        stream, rc.step_hash("judge") + f"|{juror}")
    if cell.is_done(step, h):
        return
    judge = make_judge(name, store, rc.config.metrics.em_definition)
    done = {k for k, error in cell.keys(stream, ("item_id", "error")) if error is None}
    answers = cell.records("generations")
    inputs = [judge_input(g, rc.task) for g in answers if g["key"] not in done]
    failed = []
    for j in judge.judge_many(inputs):
        cell.append(stream, j.to_record())  # a retried item's last record is the one read
        failed += [j.error] if j.error else []
    endpoint = getattr(judge, "endpoint", None)
    if endpoint is not None and len(failed) > MAX_FAILED_SHARE * len(answers):
        raise JudgingFailed([JudgeFailure(name, endpoint, cell.id, len(failed), len(answers),
                                          failed[-1])])
    if failed:
        logger.warning("cell %s: %d of %d judgments by %s failed (%s); counted apart",
                       cell.id, len(failed), len(answers), name, failed[-1])
    cell.mark_done(step, h)


def score_step(rc: ResolvedCell, cell: Cell) -> None:
    _write_metrics(cell, rc.task, rc.config, dict(zip(rc.config.jury, rc.jury, strict=True)),
                   rc.judge)
    cell.mark_done("score", rc.step_hash("score"))


def _write_metrics(cell: Cell, task: TaskSpec, cfg, jurors: dict[str, str], judge: str) -> None:
    """metrics.json from the cell's stored judgments (`jurors`: each juror by its full name)."""
    frame = judged_frame(cell)
    result = score_frame(frame, task, cfg)
    if jurors:
        result["jury"] = {full: jury_agreement(frame, judged_frame(cell, jury_stream(juror)),
                                               task, cfg) for juror, full in jurors.items()}
    if cell.read_json("lm_eval.json") is not None:
        result["lm_eval"] = cell.read_json("lm_eval.json")
    cell.write_json("metrics.json", {"metrics": result, "thresholds": cfg.metrics.model_dump(),
                                     "judge": judge, "scoring_version": SCORING_VERSION})


def rescore_cell(cell: Cell) -> bool:
    """Score a scored cell again from its stored judgments, by this code's definitions (a store
    written by an older scoring version gains the newer metrics); False for a cell already
    scored by this version. Nothing is judged, generated or trained."""
    from em_bench.config import CellConfig

    stored = cell.read_json("metrics.json") or {}
    if stored.get("scoring_version") == SCORING_VERSION:
        return False
    record = cell.read_config()
    cfg = CellConfig.model_validate(record["config"])
    jurors = dict(zip(cfg.jury, (record.get("jury") or []), strict=False))
    _write_metrics(cell, TaskSpec.model_validate(record["task_spec"]), cfg, jurors,
                   stored.get("judge") or record.get("judge"))
    return True

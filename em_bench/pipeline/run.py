"""Running a cell: resume it through every step, borrowing the finished steps of a cell with
the same inputs; and rejudging a cell's stored answers with another judge."""

from __future__ import annotations

import logging

from em_bench.config import CellConfig
from em_bench.defenses import defense_card, describe_defense
from em_bench.defenses.base import DefenseContext
from em_bench.errors import JudgingFailed, NoStoredAnswers
from em_bench.judge import make_judge
from em_bench.models import load_base
from em_bench.pipeline.answers import generate_step, lm_eval_step
from em_bench.pipeline.judging import judge_and_score, rescore_cell
from em_bench.pipeline.resolved import ResolvedCell, provenance, resolve
from em_bench.pipeline.training import train_step
from em_bench.store import REUSABLE_STEPS, Cell, Store
from em_bench.tasks import TaskSpec

logger = logging.getLogger(__name__)


def run_cell(cfg: CellConfig, store: Store, task: TaskSpec | None = None) -> Cell:
    """Run (or resume) one cell through every step and return its store entry."""
    rc = resolve(cfg, task)
    cell = store.cell(rc.cell_id)
    if cell.read_config() is None:
        cell.write_config({**rc.payload(), "cell_id": rc.cell_id, **_flat(rc.config),
                           "method": describe_defense(cfg.defense, rc.config.defense_params,
                                                      DefenseContext.of(rc.task, cfg)),
                           "card": defense_card(cfg.defense),
                           "provenance": provenance(cfg.model, (cfg.judge, *cfg.jury))})
    if cell.is_done("score", rc.step_hash("score")):
        return cell
    logger.info("cell %s: %s / %s / %s / seed %d", rc.cell_id, cfg.model, cfg.task,
                cfg.defense, cfg.seed)
    _borrow(rc, cell, store)
    base, tokenizer = load_base(cfg.model, cfg.dtype)
    model = train_step(rc, cell, store, base, tokenizer)
    generate_step(rc, cell, model, tokenizer)
    lm_eval_step(rc, cell, model, tokenizer)
    judge_and_score(rc, cell, store)
    return cell


def rejudge_cell(source: Cell, judge: str, store: Store) -> Cell | None:
    """Judge `source`'s stored answers with `judge` and score them, as the cell that differs
    from it only in its judge; nothing is trained or generated. None when that cell is `source`
    or is scored already; NoStoredAnswers when `source` has no finished answers."""
    stored = source.read_config()
    cfg = CellConfig.model_validate(stored["config"])
    if cfg.judge == judge:
        return None
    cfg = cfg.model_copy(update={"judge": judge})
    # The source's resolved inputs, not resolved again: its data need not be on this machine.
    rc = ResolvedCell(cfg, TaskSpec.model_validate(stored["task_spec"]), stored["model_identity"],
                      make_judge(judge, definition=cfg.metrics.em_definition).name,
                      stored.get("train_data_sha256"), stored.get("questions_sha256"),
                      stored.get("defense_inputs") or {}, tuple(stored.get("jury") or ()),
                      stored.get("rai_sha256"), stored.get("in_domain_sha256"))
    cell = store.cell(rc.cell_id)
    if cell.is_done("score", rc.step_hash("score")):
        return None
    if not source.is_done("generate", rc.step_hash("generate")):
        raise NoStoredAnswers(f"cell {source.id} ({cfg.task} / {cfg.defense} / seed {cfg.seed}) "
                              f"has no stored answers to judge; `em-bench run` makes them")
    if cell.read_config() is None:  # the answers' provenance is the source's (rejudged_from)
        cell.write_config({**rc.payload(), "cell_id": rc.cell_id, **_flat(cfg), "provenance": {
            **provenance(judges=(judge, *cfg.jury)),
            "organism": (stored.get("provenance") or {}).get("organism"),
            "rejudged_from": source.id}})
    for step in REUSABLE_STEPS:
        h = rc.step_hash(step)
        if source.is_done(step, h) and not cell.is_done(step, h):
            _copy_step(source, cell, step, h)
    judge_and_score(rc, cell, store)
    return cell


def rejudge_store(store: Store, judge: str) -> tuple[int, list[str]]:
    """Rejudge every scored cell of `store` with `judge` (rejudge_cell); returns how many cells
    were judged again and why each skipped one was (no stored answers). JudgingFailed, naming
    every failing judge, once the other cells are judged."""
    done, skipped, failures = 0, [], []
    for cell in store.done_cells("score"):
        try:
            done += rejudge_cell(cell, judge, store) is not None
        except NoStoredAnswers as e:
            skipped.append(str(e))
        except JudgingFailed as e:  # the other cells are still judged
            failures += e.failures
    if failures:
        raise JudgingFailed(failures)
    return done, skipped


def rescore_store(store: Store) -> int:
    """Score every scored cell of an older scoring version again from its stored judgments
    (judging.rescore_cell); returns how many were."""
    return sum(rescore_cell(cell) for cell in store.done_cells("score"))


def stale_cells(store: Store) -> dict[str, str]:
    """The store's cells of another build of a built-in organism than this one's, and its
    scored cells of an older scoring version without judgments to score again: cell id -> why."""
    from em_bench.models import is_organism, model_identity
    from em_bench.scoring import SCORING_VERSION

    current: dict[str, str] = {}
    stale = {}
    for cell_id in store.cell_ids():
        cell = store.cell(cell_id)
        record = cell.read_config() or {}
        model = record.get("model")
        if model and is_organism(model):
            current.setdefault(model, model_identity(model))
            if record.get("model_identity") != current[model]:
                stale[cell_id] = f"another build of {model} ({record.get('model_identity')})"
                continue
        version = (cell.read_json("metrics.json") or {}).get("scoring_version", 1)
        if cell.finished("score") and version != SCORING_VERSION \
                and not cell.records("judgments"):
            stale[cell_id] = f"scoring version {version}, no judgments to score again"
    return stale


def _borrow(rc: ResolvedCell, cell: Cell, store: Store) -> None:
    """Copy the finished steps of another cell with the same inputs (the same fine-tune and
    answers under another judge, say) instead of redoing them."""
    for step in REUSABLE_STEPS:
        h = rc.step_hash(step)
        if cell.is_done(step, h):
            continue
        source = store.find_done(step, h)
        if source is not None:  # a base cell has no train step, yet answers to reuse
            _copy_step(source, cell, step, h)


def _copy_step(source: Cell, cell: Cell, step: str, h: str) -> None:
    """Copy another cell's outputs of a step finished on inputs `h`, and mark it done."""
    cell.copy_step_outputs(source, step)
    cell.mark_done(step, h)
    logger.info("cell %s: %s reused from cell %s", cell.id, step, source.id)


def _flat(cfg: CellConfig) -> dict:
    return {"model": cfg.model, "task": cfg.task, "defense": cfg.defense,
            "defense_params": cfg.defense_params, "seed": cfg.seed}

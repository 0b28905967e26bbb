"""Executors: where a grid's cells run. Each one takes a store and a plan and returns one row
per planned (cell, view), in plan order.

    LocalExecutor()                    in this process, one cell after another (the default)
    RayExecutor(address=None)          one Ray task per cell, on a local Ray or a cluster
    SlurmExecutor(folder)              one Slurm job per cell (a job array), through submitit

A cell that several views share (the base model's, scored once per task) runs once; every view
is then scored from the stored cell. Whoever runs a cell holds its lock in the store
(`Cell.lock`), so two workers, or two sweeps on one store, never run the same cell at once, and
a cell already scored is not locked at all. A worker that dies leaves its cell's finished steps
and records in the store and a stale lock; the next run takes the lock over and resumes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from em_bench.board.rows import cell_row, with_refusal_drops
from em_bench.errors import EmBenchError, JudgingFailed
from em_bench.grid.plan import PlannedCell
from em_bench.pipeline import resolve, run_cell
from em_bench.progress import Progress
from em_bench.scoring import judged_frame, score_frame
from em_bench.store import Cell, Store
from em_bench.threads import choose as choose_threads

logger = logging.getLogger(__name__)

# The environment a Ray worker gets from the driver: em-bench's own settings (the organism
# cache, the store), the judge's and generation server's endpoints, and Hugging Face's. Secrets
# are not sent: a runtime env is stored and shown by Ray, and a key must never be written down;
# a worker reads its keys from its own node's environment (a local Ray's workers inherit ours).
FORWARDED_ENV = ("EM_BENCH_", "OPENAI_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_",
                 "TOKENIZERS_PARALLELISM")
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


class CellsFailed(EmBenchError):
    """Some cells of a grid failed; the others finished and are stored (a rerun resumes)."""

    def __init__(self, failures: dict[str, str], rows: list[dict], total: int):
        self.failures, self.rows = failures, rows  # cell id -> error; the finished cells' rows
        lines = "\n".join(f"  cell {cid}: {err}" for cid, err in failures.items())
        super().__init__(f"{len(failures)} of {total} cells failed (the others are stored; a "
                         f"rerun resumes the failed ones where they stopped):\n{lines}")


def cell_groups(plan: list[PlannedCell]) -> dict[str, list[tuple[int, PlannedCell]]]:
    """The plan grouped by cell id, in order of first appearance: (plan index, planned) each."""
    groups: dict[str, list[tuple[int, PlannedCell]]] = {}
    for i, p in enumerate(plan):
        groups.setdefault(resolve(p.config, p.task).cell_id, []).append((i, p))
    return groups


def run_cell_views(store: Store, planned: list[PlannedCell]) -> list[dict]:
    """Run (or resume) one cell under its lock, then score it in each view of `planned` (all
    of the same cell). A cell already scored is only read."""
    first = planned[0]
    rc = resolve(first.config, first.task)
    cell = store.cell(rc.cell_id)
    if not cell.is_done("score", rc.step_hash("score")):
        with cell.lock():  # waits while another live process runs this cell
            run_cell(first.config, store, first.task)
    return [view_row(cell, p) for p in planned]


def break_locks(store: Store, plan: list[PlannedCell]) -> dict[str, dict]:
    """Remove the locks of the plan's cells whoever holds them (`--break-locks`: only when no
    other run on this store is live). Returns what each removed lock held, by cell id."""
    broken = {}
    for cell_id in cell_groups(plan):
        lock = store.cell(cell_id).lock()
        if lock.path.exists():
            broken[cell_id] = lock.break_() or {}
    return broken


class LocalExecutor:
    """Every cell in this process, in plan order. A cell whose judging failed is left unscored
    while the others run, then JudgingFailed names every failing judge; any other error stops
    the grid at once."""

    def run(self, store: Store, plan: list[PlannedCell]) -> list[dict]:
        rows: dict[int, dict] = {}
        failures = []
        groups = cell_groups(plan)
        progress = Progress(len(groups))
        for members in groups.values():
            try:
                got = run_cell_views(store, [p for _, p in members])
            except JudgingFailed as e:
                failures += e.failures
                progress.finished(f"{describe(members[0][1])} (judging failed)")
                continue
            rows.update(zip((i for i, _ in members), got, strict=True))
            progress.finished(describe(members[0][1]))
        if failures:
            raise JudgingFailed(failures)
        return [rows[i] for i in sorted(rows)]


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The driver's variables a worker needs (FORWARDED_ENV but secrets; paths made absolute),
    then `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith(FORWARDED_ENV) and not any(w in k for w in SECRET_WORDS)}
    for k in ("EM_BENCH_CACHE", "EM_BENCH_STORE"):
        if k in env:
            env[k] = str(Path(env[k]).expanduser().resolve())
    return {**env, **(extra or {})}


def cell_task(root: str, planned: list[PlannedCell], threads: int, log_level: int) -> list[dict]:
    """A Ray task or a Slurm job: one cell and its views, in a worker that opens the shared store
    by path."""
    from em_bench.store import open_store

    choose_threads(threads)  # the cell's CPUs, not the whole node's
    em = logging.getLogger("em_bench")
    if not em.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        em.addHandler(handler)
    em.setLevel(log_level)
    return run_cell_views(open_store(root, create=False), planned)


def describe(planned: PlannedCell) -> str:
    c = planned.config
    params = "".join(f" {k}={v}" for k, v in c.defense_params.items()
                     if k != "latents" and v not in (None, []))  # unset: the default
    return f"{c.task} / {c.defense}{params} / seed {c.seed}"


def error_line(error: BaseException) -> str:
    """A failed task's error as one line: the cell's own exception, else Ray's (worker died)."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": ")


def view_row(cell: Cell, planned: PlannedCell) -> dict:
    """The row of a run cell in `planned`'s view, scored from its stored judgments."""
    result = score_frame(judged_frame(cell), planned.view, planned.config)
    return cell_row(cell, result, planned.view.name)


def run_grid(store: Store, plan: list[PlannedCell], executor=None) -> list[dict]:
    """Run (or resume) every planned cell; return one row per (cell, view), in plan order.

    `executor` decides where the cells run: by default in this process, one after another
    (LocalExecutor); a RayExecutor runs them as Ray tasks, a SlurmExecutor as Slurm jobs."""
    return with_refusal_drops((executor or LocalExecutor()).run(store, plan))

"""Executors: where a grid's cells run. Each one takes a store and a plan and returns one row
per planned (cell, view), in plan order.

    LocalExecutor()                    in this process, one cell after another (the default)
    RayExecutor(address=None)          one Ray task per cell, on a local Ray or a cluster

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

from em_bench.errors import EmBenchError
from em_bench.pipeline import resolve, run_cell
from em_bench.report import PlannedCell, view_row
from em_bench.store import Store

logger = logging.getLogger(__name__)

INSTALL_HINT = "the Ray executor needs ray: pip install 'em-bench[ray]'"
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
    """Every cell in this process, in plan order; an error stops the grid at once."""

    def run(self, store: Store, plan: list[PlannedCell]) -> list[dict]:
        return [row for p in plan for row in run_cell_views(store, [p])]


def _import_ray():
    try:
        import ray
    except ImportError:
        raise EmBenchError(INSTALL_HINT) from None
    return ray


def _machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The driver's variables a worker needs (FORWARDED_ENV but secrets; paths made absolute),
    then `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith(FORWARDED_ENV) and not any(w in k for w in SECRET_WORDS)}
    for k in ("EM_BENCH_CACHE", "EM_BENCH_STORE"):
        if k in env:
            env[k] = str(Path(env[k]).expanduser().resolve())
    return {**env, **(extra or {})}


def _ray_cell(root: str, planned: list[PlannedCell], threads: int, log_level: int) -> list[dict]:
    """A Ray task: one cell and its views, in a worker that opens the shared store by path."""
    import torch

    from em_bench.store import open_store

    torch.set_num_threads(threads)  # the cell's CPUs, not the whole node's
    em = logging.getLogger("em_bench")
    if not em.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        em.addHandler(handler)
    em.setLevel(log_level)
    return run_cell_views(open_store(root, create=False), planned)


def _describe(planned: PlannedCell) -> str:
    c = planned.config
    return f"{c.task} / {c.defense} / seed {c.seed}"


def _error_line(error: BaseException) -> str:
    """A failed task's error as one line: the cell's own exception, else Ray's (worker died)."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": ")


class RayExecutor:
    """One Ray task per cell (cells shared by several views run once), gathered as they finish.

    `address`: None starts a local Ray here (no dashboard, this machine's CPUs); "auto" or
    "ray://host:10001" joins a cluster (a Ray already initialised in this process is used
    as it is). Every worker must have em-bench installed and see the store, the organism cache
    and every data file at the same absolute paths (a shared filesystem; plan_grid and the
    command line make the paths they are given absolute). `num_gpus_per_cell`: None means one
    when the cluster has GPUs, else none. `max_retries`: Ray's reruns of a task whose worker
    died (a rerun resumes the cell); an exception inside a cell is not retried. A failed cell
    does not stop the others; the run then raises CellsFailed naming each. `env_vars` adds to
    the driver's variables the workers get (worker_env). Use as a context manager, or call
    close(), to shut down a Ray this executor started.
    """

    def __init__(self, address: str | None = None, num_gpus_per_cell: float | None = None,
                 num_cpus_per_cell: float = 1, max_retries: int = 3,
                 env_vars: Mapping[str, str] | None = None):
        self.address, self.num_gpus_per_cell = address, num_gpus_per_cell
        self.num_cpus_per_cell, self.max_retries = num_cpus_per_cell, max_retries
        self.env_vars = dict(env_vars or {})
        self._ray = _import_ray()  # fail at once, before any planning or work
        self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False

    def _connect(self):
        ray = self._ray
        if not ray.is_initialized():
            if self.address is None:  # "local": a new Ray here, even when RAY_ADDRESS is set
                ray.init(address="local", num_cpus=_machine_cpus(), include_dashboard=False)
            else:
                ray.init(address=self.address)
            self._started = True
        return ray

    def run(self, store: Store, plan: list[PlannedCell]) -> list[dict]:
        ray = self._connect()
        groups = cell_groups(plan)
        gpus = self.num_gpus_per_cell
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(_ray_cell).options(
            num_cpus=self.num_cpus_per_cell, num_gpus=gpus, max_retries=self.max_retries,
            runtime_env={"env_vars": worker_env(self.env_vars)})
        root = str(store.root.expanduser().resolve())
        threads = max(1, int(self.num_cpus_per_cell))
        level = logging.getLogger("em_bench").getEffectiveLevel()
        refs = {task.remote(root, [p for _, p in members], threads, level): cell_id
                for cell_id, members in groups.items()}
        rows: dict[int, dict] = {}
        failures: dict[str, str] = {}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    cell_id = refs[ref]
                    try:
                        got = ray.get(ref)
                    except Exception as e:  # reported with its cell, below
                        what = _describe(groups[cell_id][0][1])
                        failures[cell_id] = f"{what}: {_error_line(e)}"
                        logger.error("cell %s failed: %s", cell_id, e)
                        continue
                    for (i, _), row in zip(groups[cell_id], got, strict=True):
                        rows[i] = row
                    logger.info("cell %s done (%d of %d)", cell_id,
                                len(refs) - len(pending) - len(failures), len(refs))
        except KeyboardInterrupt:  # the cells in flight stop where they are; a rerun resumes
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        ordered = [rows[i] for i in sorted(rows)]
        if failures:
            raise CellsFailed(failures, ordered, len(groups))
        return ordered

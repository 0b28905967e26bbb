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
import re
import time
from collections.abc import Mapping
from pathlib import Path

from em_bench.errors import ConfigError, EmBenchError, JudgingFailed
from em_bench.pipeline import resolve, run_cell
from em_bench.progress import Progress
from em_bench.report import PlannedCell, view_row
from em_bench.store import Store
from em_bench.threads import choose as choose_threads
from em_bench.threads import usable_cores

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
                progress.finished(f"{_describe(members[0][1])} (judging failed)")
                continue
            rows.update(zip((i for i, _ in members), got, strict=True))
            progress.finished(_describe(members[0][1]))
        if failures:
            raise JudgingFailed(failures)
        return [rows[i] for i in sorted(rows)]


def _import_ray():
    try:
        import ray
    except ImportError:
        raise EmBenchError(INSTALL_HINT) from None
    return ray


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The driver's variables a worker needs (FORWARDED_ENV but secrets; paths made absolute),
    then `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith(FORWARDED_ENV) and not any(w in k for w in SECRET_WORDS)}
    for k in ("EM_BENCH_CACHE", "EM_BENCH_STORE"):
        if k in env:
            env[k] = str(Path(env[k]).expanduser().resolve())
    return {**env, **(extra or {})}


def _cell_task(root: str, planned: list[PlannedCell], threads: int, log_level: int) -> list[dict]:
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


def _describe(planned: PlannedCell) -> str:
    c = planned.config
    params = "".join(f" {k}={v}" for k, v in c.defense_params.items() if k != "latents")
    return f"{c.task} / {c.defense}{params} / seed {c.seed}"


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
    command line make the paths they are given absolute). `num_gpus_per_cell`: None means the
    cell's (`CellConfig.gpus`: one a training process, or its vLLM engine's tensor-parallel
    size) when the cluster has GPUs, else none; a cell also asks for a CPU a training process.
    `max_retries`: Ray's reruns of a task whose worker died (a rerun resumes the cell); an
    exception inside a cell is not retried. A failed cell does not stop the others; the run
    then raises CellsFailed naming each. `env_vars` adds to the driver's variables the workers
    get (worker_env). Use as a context manager, or call close(), to shut down a Ray this
    executor started.
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
                ray.init(address="local", num_cpus=usable_cores(), include_dashboard=False)
            else:
                ray.init(address=self.address)
            self._started = True
        return ray

    def run(self, store: Store, plan: list[PlannedCell]) -> list[dict]:
        ray = self._connect()
        groups = cell_groups(plan)
        has_gpus = ray.cluster_resources().get("GPU", 0) >= 1
        task = ray.remote(_cell_task)
        env = {"env_vars": worker_env(self.env_vars)}
        root = str(store.root.expanduser().resolve())
        threads = max(1, int(self.num_cpus_per_cell))
        level = logging.getLogger("em_bench").getEffectiveLevel()
        refs = {}
        for cell_id, members in groups.items():
            cfg = members[0][1].config
            gpus = self.num_gpus_per_cell
            if gpus is None:
                gpus = cfg.gpus if has_gpus else 0
            sized = task.options(num_cpus=max(self.num_cpus_per_cell, cfg.train.processes),
                                 num_gpus=gpus, max_retries=self.max_retries, runtime_env=env)
            refs[sized.remote(root, [p for _, p in members], threads, level)] = cell_id
        rows: dict[int, dict] = {}
        failures: dict[str, str] = {}
        pending = list(refs)
        progress = Progress(len(groups))
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
                        progress.finished(f"{what} (failed)")
                        continue
                    for (i, _), row in zip(groups[cell_id], got, strict=True):
                        rows[i] = row
                    progress.finished(_describe(groups[cell_id][0][1]))
        except KeyboardInterrupt:  # the cells in flight stop where they are; a rerun resumes
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        ordered = [rows[i] for i in sorted(rows)]
        if failures:
            raise CellsFailed(failures, ordered, len(groups))
        return ordered


SLURM_INSTALL_HINT = "the Slurm executor needs submitit: pip install 'em-bench[slurm]'"


def _import_submitit():
    try:
        import submitit
    except ImportError:
        raise EmBenchError(SLURM_INSTALL_HINT) from None
    return submitit


def _slurm_cell(root: str, planned: list[PlannedCell], threads: int, log_level: int,
                env: dict[str, str]) -> list[dict]:
    """A Slurm job: the driver's variables (worker_env: no secrets), then one cell and its
    views. A node's own environment may lack them (sbatch --export, another login shell)."""
    os.environ.update(env)
    return _cell_task(root, planned, threads, log_level)


def _trace_error(trace: str) -> str:
    """The exception line of a Python traceback (its last exception's, first line)."""
    lines = trace.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    found = next((line.strip() for line in lines[starts[-1] + 1 if starts else 0:]
                  if line.strip() and not line[0].isspace()), lines[-1].strip() if lines else "")
    name, colon, message = found.partition(":")
    if colon and re.fullmatch(r"[\w.]+", name):  # em_bench.errors.DataError: as _error_line
        return f"{name.rpartition('.')[2]}:{message}"
    return found


def _job_error(error: BaseException) -> str:
    """A failed job's error as one line: its cell's exception (from the trace submitit kept),
    else why the job ended without a result (killed, timed out, cancelled, node failure)."""
    text = str(error)
    if type(error).__name__ == "FailedJobError":
        trace = text.split("-" * 22 + "\n")
        return _trace_error(trace[1] if len(trace) > 2 else text)
    if type(error).__name__ == "UncompletedJobError":
        state = re.search(r"\(state: ([^)]*)\)", text)
        return f"the job ended without a result (state: {state[1] if state else 'unknown'})"
    return _error_line(error)


class SlurmExecutor:
    """One Slurm job per cell (cells shared by several views run once), submitted through
    submitit as one job array and gathered as they finish.

    `folder`: where submitit keeps the jobs' pickles and logs (`<job id>_0_log.err`); like the
    store, the organism cache and every data file, every node must see it at the same absolute
    path. `partition`, `time_minutes`, `gpus_per_cell`, `cpus_per_cell` and `mem_gb` become
    each job's `--partition`, `--time`, `--gpus-per-node`, `--cpus-per-task` and `--mem`
    (submitit's slurm_partition, timeout_min, gpus_per_node, cpus_per_task, mem_gb); a cell
    runs torch on `cpus_per_cell` threads and needs `CellConfig.gpus` GPUs (its training
    processes, its vLLM engine's; CPUs on a cluster without GPUs). `cluster`: None means
    Slurm, and fails at once on a machine without it (no srun on the PATH); "local" runs the
    jobs as subprocesses here, with no scheduler: the driver starts at most `max_parallel` at
    once (default: this machine's CPUs over `cpus_per_cell`). On Slurm `max_parallel`
    throttles the array (`%N`). Every job gets the driver's variables (worker_env: never
    secrets, since the pickled job is written to `folder`; `env_vars` adds to them) and needs
    em-bench installed for the driver's Python (submitit runs `sys.executable` on the node). A
    failed job does not stop the others; the run then raises CellsFailed naming each cell with
    its job's error and log. A job Slurm kills (time limit, preemption) leaves its cell's lock
    held by its node: remove it with `em-bench run --break-locks` (no other run live), and a
    rerun resumes the cell.
    """

    CLUSTERS = (None, "slurm", "local")

    def __init__(self, folder: str | Path, partition: str | None = None, time_minutes: int = 60,
                 gpus_per_cell: int = 0, cpus_per_cell: int = 1, mem_gb: float = 16,
                 cluster: str | None = None, max_parallel: int | None = None,
                 env_vars: Mapping[str, str] | None = None):
        if cluster not in self.CLUSTERS:  # "debug" would open pdb on a cell's error
            raise ConfigError(f"SlurmExecutor cluster {cluster!r}: give None (Slurm), 'slurm' "
                              f"or 'local'; to run cells in this process use LocalExecutor")
        self.folder = Path(folder).expanduser().resolve()
        self.partition, self.time_minutes = partition, time_minutes
        self.gpus_per_cell, self.cpus_per_cell, self.mem_gb = gpus_per_cell, cpus_per_cell, mem_gb
        self.cluster, self.max_parallel = cluster, max_parallel
        self.env_vars = dict(env_vars or {})
        self._submitit = _import_submitit()  # fail at once, before any planning or work
        if cluster is None and self._submitit.AutoExecutor.which() != "slurm":
            # submitit would fall back to local subprocesses: say so instead
            raise ConfigError("no Slurm on this machine (srun is not on the PATH); run where "
                              "sbatch works, or give cluster='local' to run the jobs here")

    def _executor(self):
        executor = self._submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        executor.update_parameters(  # None is left out: no `--gpus-per-node=0` on Slurm
            name="em-bench", timeout_min=self.time_minutes,
            gpus_per_node=self.gpus_per_cell or None, cpus_per_task=self.cpus_per_cell,
            mem_gb=self.mem_gb, slurm_partition=self.partition, slurm_array_parallelism=(
                self.max_parallel if executor.cluster == "slurm" else None))
        return executor

    def run(self, store: Store, plan: list[PlannedCell]) -> list[dict]:
        groups = cell_groups(plan)
        wanted = max(p.config.gpus for p in plan)
        if wanted > (self.gpus_per_cell or self.cpus_per_cell):
            raise ConfigError(f"a cell uses {wanted} GPUs at once (training processes, or vLLM's "
                              f"tensor parallelism; CPUs on a cluster without GPUs): give the "
                              f"jobs that many (gpus_per_cell {self.gpus_per_cell}, "
                              f"cpus_per_cell {self.cpus_per_cell})")
        executor = self._executor()
        local = executor.cluster == "local"
        limit = self.max_parallel or (max(1, usable_cores() // self.cpus_per_cell) if local
                                      else None)
        root = str(store.root.expanduser().resolve())
        level = logging.getLogger("em_bench").getEffectiveLevel()
        env = worker_env(self.env_vars)

        def submit(cell_ids: list[str]) -> list[tuple[object, str]]:
            n = len(cell_ids)
            jobs = executor.map_array(
                _slurm_cell, [root] * n, [[p for _, p in groups[c]] for c in cell_ids],
                [max(1, int(self.cpus_per_cell))] * n, [level] * n, [env] * n)
            for cell_id, job in zip(cell_ids, jobs, strict=True):
                logger.info("cell %s: job %s (log %s)", cell_id, job.job_id, job.paths.stderr)
            return list(zip(jobs, cell_ids, strict=True))

        # On Slurm the whole sweep is one array; "local" has no scheduler, so the driver keeps
        # at most `limit` jobs running and starts the next ones as jobs end.
        waiting = list(groups)
        running: list[tuple[object, str]] = []
        rows: dict[int, dict] = {}
        failures: dict[str, str] = {}
        poll = 0.2 if local else 5.0
        progress = Progress(len(groups))
        try:
            while waiting or running:
                if waiting and (limit is None or len(running) < limit):
                    take = len(waiting) if limit is None else limit - len(running)
                    running += submit(waiting[:take])
                    waiting = waiting[take:]
                finished = [(job, c) for job, c in running if job.done()]
                for job, cell_id in finished:
                    running.remove((job, cell_id))
                    error = job.exception()
                    if error is not None:
                        what = _describe(groups[cell_id][0][1])
                        failures[cell_id] = (f"{what}: {_job_error(error)} (job {job.job_id}, "
                                             f"log {job.paths.stderr})")
                        logger.error("cell %s failed: %s", cell_id, failures[cell_id])
                        progress.finished(f"{what} (failed)")
                        continue
                    for (i, _), row in zip(groups[cell_id], job.result(), strict=True):
                        rows[i] = row
                    progress.finished(_describe(groups[cell_id][0][1]))
                if running and not finished:
                    time.sleep(poll)
        except KeyboardInterrupt:  # the cells in flight stop where they are; a rerun resumes
            for job, _ in running:
                job.cancel(check=False)
            raise
        ordered = [rows[i] for i in sorted(rows)]
        if failures:
            raise CellsFailed(failures, ordered, len(groups))
        return ordered

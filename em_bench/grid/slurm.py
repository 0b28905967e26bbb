"""The Slurm executor: one Slurm job per cell (a job array), through submitit."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from em_bench.errors import ConfigError, EmBenchError
from em_bench.grid.plan import PlannedCell
from em_bench.grid.run import CellsFailed, cell_groups, cell_task, describe, error_line, worker_env
from em_bench.progress import Progress
from em_bench.store import Store
from em_bench.threads import usable_cores

SLURM_INSTALL_HINT = "the Slurm executor needs submitit: pip install 'em-bench[slurm]'"

logger = logging.getLogger(__name__)


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
    return cell_task(root, planned, threads, log_level)


def _trace_error(trace: str) -> str:
    """The exception line of a Python traceback (its last exception's, first line)."""
    lines = trace.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    found = next((line.strip() for line in lines[starts[-1] + 1 if starts else 0:]
                  if line.strip() and not line[0].isspace()), lines[-1].strip() if lines else "")
    name, colon, message = found.partition(":")
    if colon and re.fullmatch(r"[\w.]+", name):  # em_bench.errors.DataError: as error_line
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
    return error_line(error)


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
                        what = describe(groups[cell_id][0][1])
                        failures[cell_id] = (f"{what}: {_job_error(error)} (job {job.job_id}, "
                                             f"log {job.paths.stderr})")
                        logger.error("cell %s failed: %s", cell_id, failures[cell_id])
                        progress.finished(f"{what} (failed)")
                        continue
                    for (i, _), row in zip(groups[cell_id], job.result(), strict=True):
                        rows[i] = row
                    progress.finished(describe(groups[cell_id][0][1]))
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

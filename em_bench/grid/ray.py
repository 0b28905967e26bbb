"""The Ray executor: one Ray task per cell, on a local Ray or a cluster."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from em_bench.errors import EmBenchError
from em_bench.grid.plan import PlannedCell
from em_bench.grid.run import (
    CellsFailed,
    cell_groups,
    cell_task,
    describe,
    error_line,
    worker_env,
)
from em_bench.progress import Progress
from em_bench.store import Store
from em_bench.threads import usable_cores

INSTALL_HINT = "the Ray executor needs ray: pip install 'em-bench[ray]'"

logger = logging.getLogger(__name__)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise EmBenchError(INSTALL_HINT) from None
    return ray


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
        task = ray.remote(cell_task)
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
                        what = describe(groups[cell_id][0][1])
                        failures[cell_id] = f"{what}: {error_line(e)}"
                        logger.error("cell %s failed: %s", cell_id, e)
                        progress.finished(f"{what} (failed)")
                        continue
                    for (i, _), row in zip(groups[cell_id], got, strict=True):
                        rows[i] = row
                    progress.finished(describe(groups[cell_id][0][1]))
        except KeyboardInterrupt:  # the cells in flight stop where they are; a rerun resumes
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        ordered = [rows[i] for i in sorted(rows)]
        if failures:
            raise CellsFailed(failures, ordered, len(groups))
        return ordered

"""An executor chosen by name, as `em-bench run --executor` chooses it: local, ray or slurm,
with that executor's options."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from em_bench.errors import ConfigError
from em_bench.grid.plan import PlannedCell
from em_bench.grid.run import LocalExecutor, break_locks, run_grid
from em_bench.store import Store

EXECUTORS = ("local", "ray", "slurm")


@dataclass(frozen=True)
class ExecutorChoice:
    """Where a grid's cells run and that executor's options, checked when made (so before any
    planning or work): `ray_address` is Ray's, the `slurm_*` ones Slurm's (SlurmExecutor;
    default folder: the store's slurm/). `break_locks`: first remove the planned cells' locks,
    whoever holds them (only when no other run on the store is live)."""

    name: str = "local"
    ray_address: str | None = None
    slurm_partition: str | None = None
    slurm_time_minutes: int | None = None
    slurm_folder: Path | None = None
    break_locks: bool = False

    def __post_init__(self):
        if self.name not in EXECUTORS:
            raise ConfigError(f"executor {self.name!r}: give one of {', '.join(EXECUTORS)}")
        if self.ray_address and self.name != "ray":
            raise ConfigError("--ray-address needs --executor ray")
        slurm = (self.slurm_partition, self.slurm_time_minutes, self.slurm_folder)
        if self.name != "slurm" and any(option is not None for option in slurm):
            raise ConfigError("--slurm-partition, --slurm-time-minutes and --slurm-folder need "
                              "--executor slurm")


@contextmanager
def make_executor(choice: ExecutorChoice, store: Store) -> Iterator:
    """The chosen executor for `store`, shut down after (a Ray it started)."""
    if choice.name == "ray":
        from em_bench.grid.ray import RayExecutor

        with RayExecutor(choice.ray_address) as executor:
            yield executor
    elif choice.name == "slurm":
        from em_bench.grid.slurm import SlurmExecutor

        yield SlurmExecutor(choice.slurm_folder or store.slurm_folder(),
                            partition=choice.slurm_partition,
                            time_minutes=choice.slurm_time_minutes or 60)
    else:
        yield LocalExecutor()


def run_grid_on(choice: ExecutorChoice, store: Store, plan: list[PlannedCell],
                on_broken_lock: Callable[[str, dict], None] | None = None) -> list[dict]:
    """run_grid on the chosen executor; with `choice.break_locks`, the plan's cells' locks are
    removed first, each reported to `on_broken_lock(cell id, what the lock held)`."""
    if choice.break_locks:
        for cell_id, held in break_locks(store, plan).items():
            if on_broken_lock is not None:
                on_broken_lock(cell_id, held)
    with make_executor(choice, store) as executor:
        return run_grid(store, plan, executor)

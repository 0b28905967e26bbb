"""How many CPU threads torch gets: the cores free when em-bench starts, decided once.

A torch step waits for its slowest thread. With more threads than free cores, one of them is
always preempted by another process, and every step stalls: on 2 cores beside one busy process,
two threads made an organism build step 3-15x slower, where one thread loses only the share of
the CPU the other process takes. `--threads` or EM_BENCH_THREADS override the choice; the count
is recorded in each cell's provenance (not in its id: results do not depend on it by design,
see README on reproducibility).
"""

from __future__ import annotations

import os
import time

from em_bench.errors import ConfigError

ENV = "EM_BENCH_THREADS"
_chosen: dict | None = None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user time
    return total - idle, total


def busy_cores(interval: float = 0.15) -> float:
    """How many cores other processes keep busy, measured over `interval` seconds (during
    which this process sleeps); 0.0 where the OS does not tell."""
    before = _cpu_times()
    if before is None:
        return 0.0
    time.sleep(interval)
    after = _cpu_times()
    busy, total = after[0] - before[0], after[1] - before[1]
    return 0.0 if total <= 0 else busy / total * (os.cpu_count() or 1)


def free_cores(interval: float = 0.15) -> int:
    """The usable cores that no other process keeps busy, at least 1."""
    cores = usable_cores()
    return max(1, min(cores, int(cores - busy_cores(interval) + 0.5)))


def choose(cli_value: int | None = None) -> dict:
    """Set torch's thread count once per process: `cli_value`, else EM_BENCH_THREADS, else the
    free cores. Returns {"threads": n, "chosen_by": ...}, as recorded in provenance."""
    global _chosen
    import torch

    env = os.environ.get(ENV)
    if cli_value is not None:
        n, how = cli_value, "--threads"
    elif env:
        n, how = (int(env) if env.isdigit() else 0), ENV
    else:
        n, how = free_cores(), f"free cores of {usable_cores()}"
    if n < 1:
        raise ConfigError(f"{how}: a thread count is a whole number >= 1, not "
                          f"{cli_value if how == '--threads' else env!r}")
    torch.set_num_threads(n)
    _chosen = {"threads": n, "chosen_by": how}
    return _chosen


def chosen() -> dict:
    """What this process runs with: the choice made at start, else torch's own default."""
    import torch

    return dict(_chosen or {"threads": torch.get_num_threads(), "chosen_by": "torch default"})

"""Executors and cell locks: a sweep on a local Ray gives exactly the in-process metrics, a
killed worker fails only its cell and a rerun resumes it without redoing finished cells; the
cell lock is exclusive and a dead owner's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from em_bench.board.rows import leaderboard_rows
from em_bench.config import CellConfig, SamplingConfig
from em_bench.grid.plan import plan_grid
from em_bench.grid.run import CellsFailed, LocalExecutor, cell_groups, run_grid, worker_env
from em_bench.store import CellLock, open_store
from tests.helpers import CheckedThread, require

# 2 tasks x 2 defenses = 4 fine-tuned cells, plus the base model (scored in both tasks'
# views): 5 cells, 6 rows. Each takes a few seconds.
CELLS = 5
BASE = CellConfig(sampling=SamplingConfig(samples_per_question=1, max_new_tokens=8))


def _plan():
    return plan_grid(BASE, ["medical", "legal"], ["none", "kl"], [0], {"steps": 5})


# the lock ---------------------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(path: Path, **holder) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "token": "theirs", **holder}))


def test_a_held_lock_excludes_a_second_owner_until_released(tmp_path):
    first, second = CellLock(tmp_path / "lock", poll=0.01), CellLock(tmp_path / "lock")
    assert first.try_acquire()
    held = first.holder()
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert not second.try_acquire()
    assert not second.acquire(timeout=0.1)  # waits, then gives up
    first.release()
    assert not (tmp_path / "lock").exists()
    with second:
        assert second.holder()["token"] == second.token
    assert not (tmp_path / "lock").exists()


def test_threads_contending_for_a_lock_take_turns(tmp_path):
    inside, most, lock_path = [0], [0], tmp_path / "lock"

    def work():
        for _ in range(20):
            with CellLock(lock_path, poll=0.001):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.0005)
                inside[0] -= 1

    threads = [CheckedThread(work) for _ in range(6)]  # an error in one fails the test
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and not lock_path.exists()


def test_a_dead_owners_lock_is_taken_over(tmp_path):
    path = tmp_path / "lock"
    _write_lock(path, pid=_dead_pid())
    lock = CellLock(path)
    assert lock.is_stale(lock.holder()) and lock.try_acquire()
    assert lock.holder()["token"] == lock.token != "theirs"
    lock.release()

    # a live process holds it until it dies (a zombie, not yet reaped, counts as dead)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[19]
        _write_lock(path, pid=proc.pid, started=started)
        assert not lock.try_acquire()
        _write_lock(path, pid=proc.pid, started="1")  # the pid now names another process
        assert lock.try_acquire()
        lock.release()
        _write_lock(path, pid=proc.pid, started=started)
        proc.send_signal(signal.SIGKILL)
        time.sleep(0.2)
        assert lock.try_acquire()
        lock.release()
    finally:
        proc.kill()
        proc.wait()


def test_another_hosts_lock_waits_until_broken_and_a_broken_lock_is_not_released(tmp_path):
    path = tmp_path / "lock"
    _write_lock(path, host="elsewhere.example", pid=_dead_pid())
    lock = CellLock(path)
    assert not lock.is_stale(lock.holder()) and not lock.try_acquire()
    assert lock.break_()["host"] == "elsewhere.example"
    assert lock.try_acquire()
    lock.break_()  # someone broke ours and took it
    _write_lock(path, pid=os.getpid())
    lock.release()
    assert json.loads(path.read_text())["token"] == "theirs"  # theirs stays


def test_a_lock_being_written_is_held_until_it_is_old(tmp_path):
    path = tmp_path / "lock"
    path.write_text("")  # created, content not yet written
    lock = CellLock(path)
    assert lock.holder() == {} and not lock.try_acquire()
    old = time.time() - 2 * CellLock.UNREADABLE_GRACE
    os.utime(path, (old, old))
    assert lock.try_acquire()


@pytest.mark.usefixtures("organism")  # planning resolves the cells: the organism names them
def test_the_plan_groups_a_shared_base_cell_and_workers_get_the_cache(monkeypatch):
    plan = _plan()
    groups = cell_groups(plan)
    assert len(plan) == 6 and len(groups) == CELLS
    shared = [m for m in groups.values() if len(m) > 1]
    assert len(shared) == 1 and all({p.view.name for _, p in m} == {"medical", "legal"}
                                    for m in shared)
    monkeypatch.setenv("EM_BENCH_CACHE", ".")
    env = worker_env({"X": "1"})
    assert env["EM_BENCH_CACHE"] == str(Path.cwd()) and env["X"] == "1"
    assert env["HF_HUB_OFFLINE"] == os.environ["HF_HUB_OFFLINE"]
    monkeypatch.setenv("OPENAI_BASE_URL", "http://judge/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-sent")
    monkeypatch.setenv("HF_TOKEN", "hf-never-sent")
    env = worker_env()
    assert env["OPENAI_BASE_URL"] == "http://judge/v1"
    assert "OPENAI_API_KEY" not in env and "HF_TOKEN" not in env  # a runtime env is not secret


# the sweep --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_torch_thread, organism):
    """The sweep in process, as run_grid always ran it (one torch thread, as each Ray cell)."""
    store = open_store(tmp_path_factory.mktemp("local") / "store")
    return store, run_grid(store, _plan(), LocalExecutor())


def _read_lock(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _kill_a_worker_midway(root: Path, stop: threading.Event, killed: list,
                          after: int = 2) -> None:
    """Once `after` cells are scored, SIGKILL the Ray worker (the pid in a cell's lock) running
    a cell that has trained but not yet scored; again if that cell finished before the kill.
    Run in a CheckedThread: its assertion fails the test when the thread is joined."""
    cells = root / "cells"
    while not stop.is_set():
        if len(list(cells.glob("*/steps/score.done"))) >= after:
            for lock in cells.glob("*/lock"):
                steps = lock.parent / "steps"
                holder = _read_lock(lock)
                if not holder or not (steps / "train.done").exists() \
                        or (steps / "score.done").exists():
                    continue
                assert holder["pid"] != os.getpid()
                snapshot = {k: v for k, v in _files(lock.parent).items()
                            if k.startswith(("trained/", "train/"))}
                os.kill(holder["pid"], signal.SIGKILL)
                time.sleep(0.3)
                if _read_lock(lock) == holder:  # it died holding the cell
                    killed.append((lock.parent.name, snapshot))
                    return
        time.sleep(0.02)


def _files(cell_dir: Path) -> dict[str, int]:
    return {str(f.relative_to(cell_dir)): f.stat().st_mtime_ns
            for f in cell_dir.rglob("*") if f.is_file()}


@pytest.fixture(scope="module")
def ray_runs(tmp_path_factory, organism):
    """The sweep on a local Ray, a worker killed midway (no Ray retries), then rerun."""
    require("ray")  # the dev extra has it: missing, the test fails
    from em_bench.grid.ray import RayExecutor

    store = open_store(tmp_path_factory.mktemp("ray") / "store")
    with RayExecutor(num_cpus_per_cell=1, max_retries=0) as executor:
        stop, killed = threading.Event(), []
        killer = CheckedThread(_kill_a_worker_midway, store.root, stop, killed, daemon=True)
        killer.start()
        t0 = time.perf_counter()
        try:
            with pytest.raises(CellsFailed) as failed:
                run_grid(store, _plan(), executor)
        finally:
            stop.set()
            killer.join()
        first_seconds = time.perf_counter() - t0
        cells = store.root / "cells"
        finished = {c.id: _files(c.path) for c in store.done_cells("score")}
        stale = {p.parent.name for p in cells.glob("*/lock")}
        t0 = time.perf_counter()
        rows = run_grid(store, _plan(), executor)
        rerun_seconds = time.perf_counter() - t0
        yield {"store": store, "error": failed.value, "killed": killed, "finished": finished,
               "stale": stale, "rows": rows, "executor": executor,
               "seconds": (first_seconds, rerun_seconds)}


@pytest.mark.slow
def test_a_killed_worker_fails_only_its_cell_and_the_error_names_it(ray_runs):
    error, killed = ray_runs["error"], ray_runs["killed"]
    assert killed, "no worker was killed midway"
    assert set(error.failures) == ray_runs["stale"] and killed[0][0] in error.failures
    for cell_id, line in error.failures.items():
        assert cell_id in str(error) and line in str(error)
        assert "Worker" in line or "died" in line.lower(), line
    # every other cell finished, and their rows came back with the error
    assert len(ray_runs["finished"]) == CELLS - len(error.failures)
    assert {r["cell_id"] for r in error.rows} == set(ray_runs["finished"])


@pytest.mark.slow
def test_a_rerun_resumes_the_killed_cell_and_redoes_no_finished_work(ray_runs):
    store = ray_runs["store"]
    assert len(store.done_cells("score")) == CELLS and not list(store.root.glob("cells/*/lock*"))
    for cell_id, files in ray_runs["finished"].items():  # not one file touched
        assert _files(store.cell(cell_id).path) == files, cell_id
    cell_id, trained = ray_runs["killed"][0]
    after = _files(store.cell(cell_id).path)
    assert {k: after[k] for k in trained} == trained  # its fine-tune was not redone


def _figures(rows: list[dict]) -> str:
    """The rows as JSON (NaN-safe, order included) but for how long a step took, which is no
    figure and no two runs share."""
    return json.dumps([{k: v for k, v in r.items() if k not in ("step_seconds",
                                                                  "step_time_ratio")}
                       for r in rows])


@pytest.mark.slow
def test_a_ray_sweep_gives_exactly_the_in_process_metrics(ray_runs, reference):
    ref_store, ref_rows = reference
    store = ray_runs["store"]
    assert store.cell_ids() == ref_store.cell_ids() and len(store.cell_ids()) == CELLS
    for cell_id in store.cell_ids():
        assert store.cell(cell_id).read_json("metrics.json") == \
            ref_store.cell(cell_id).read_json("metrics.json"), cell_id
    assert _figures(ray_runs["rows"]) == _figures(ref_rows)
    assert _figures(leaderboard_rows(store)) == _figures(leaderboard_rows(ref_store))


@pytest.mark.slow
def test_a_scored_cell_is_read_without_its_lock(reference):
    store, rows = reference
    plan = [p for p in _plan() if p.config.task == "medical" and p.config.defense == "kl"]
    for cell_id in cell_groups(plan):  # held by a live run elsewhere: no matter, it is done
        _write_lock(store.cell(cell_id).path / "lock", host="elsewhere.example", pid=1)
    t0 = time.perf_counter()
    again = run_grid(store, plan)  # the default: LocalExecutor
    assert time.perf_counter() - t0 < 30
    assert [r["em_rate"] for r in again] == [r["em_rate"] for r in rows
                                            if r["task"] == "medical" and r["defense"] == "kl"]
    for cell_id in cell_groups(plan):
        (store.cell(cell_id).path / "lock").unlink()


@pytest.mark.slow
def test_the_command_line_runs_on_ray_and_breaks_locks(ray_runs, capsys):
    from em_bench.cli import main

    store = ray_runs["store"]
    argv = ["run", "--task", "medical", "--defense", "kl", "--seeds", "0", "--steps", "5",
            "--samples", "1", "--store", str(store.root), "--format", "json"]
    assert main([*argv, "--ray-address", "auto"]) == 2
    assert "--ray-address needs --executor ray" in capsys.readouterr().err
    # the command line's cells (48 new tokens): locked by a dead run on another host
    plan = plan_grid(CellConfig(sampling=SamplingConfig(samples_per_question=1)), ["medical"],
                     ["kl"], [0], {"steps": 5, "epochs": None})
    locked = list(cell_groups(plan))
    for cell_id in locked:
        _write_lock(store.cell(cell_id).path / "lock", host="elsewhere.example", pid=1)
    # the module's Ray is up: the executor joins it (and leaves it running)
    assert main([*argv, "--executor", "ray", "--break-locks"]) == 0
    out = capsys.readouterr()
    for cell_id in locked:
        assert f"removed the lock of cell {cell_id} (held by elsewhere.example pid 1)" in out.err
        assert store.cell(cell_id).is_done("score", _score_hash(plan, cell_id))
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [(r["task"], r["cell_id"]) for r in rows] == [("base", locked[0]),
                                                         ("medical", locked[1])]
    assert not list(store.root.glob("cells/*/lock*"))


def _score_hash(plan, cell_id: str) -> str:
    from em_bench.pipeline import resolve

    p = cell_groups(plan)[cell_id][0][1]
    return resolve(p.config, p.task).step_hash("score")


@pytest.mark.slow
def test_with_retries_a_killed_workers_cell_is_resumed_in_the_same_run(ray_runs,
                                                                       tmp_path):
    from em_bench.grid.ray import RayExecutor

    store = open_store(tmp_path / "store")
    plan = plan_grid(BASE, ["medical"], ["none"], [3], {"steps": 5})
    stop, killed = threading.Event(), []
    killer = CheckedThread(_kill_a_worker_midway, store.root, stop, killed, 0, daemon=True)
    killer.start()
    try:  # joins the module's Ray; Ray reruns the task, which takes the dead worker's lock
        rows = run_grid(store, plan, RayExecutor(max_retries=1))
    finally:
        stop.set()
        killer.join()
    assert killed and len(rows) == 2 and len(store.done_cells("score")) == 2
    cell_id, trained = killed[0]
    after = _files(store.cell(cell_id).path)
    assert {k: after[k] for k in trained} == trained and "lock" not in after


@pytest.mark.slow
def test_a_ray_task_runs_a_cell_sharded_over_two_processes(ray_runs, tmp_path):
    from em_bench.grid.ray import RayExecutor

    store = open_store(tmp_path / "store")
    plan = plan_grid(BASE, ["medical"], ["none"], [0],
                     {"steps": 4, "grad_accum": 2, "processes": 2})
    with RayExecutor(max_retries=0) as executor:  # joins the module's Ray: the task asks for 2 CPUs
        rows = run_grid(store, plan, executor)
    tuned = store.cell(rows[1]["cell_id"])
    assert rows[1]["task"] == "medical" and tuned.is_done("score", _score_hash(plan, tuned.id))
    assert tuned.read_json("train/summary.json")["processes"] == 2
    assert (tuned.path / "train" / "torchrun.log").is_file()


def test_without_ray_the_executor_says_how_to_install_it(monkeypatch):
    from em_bench.errors import EmBenchError
    from em_bench.grid.ray import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(EmBenchError, match=r"pip install 'em-bench\[ray\]'"):
        RayExecutor()


# Slurm, through submitit's local cluster (each job a subprocess of this machine) ---------------

@pytest.fixture(scope="module")
def slurm_sweep(tmp_path_factory, reference):
    """The medical view's part of the sweep (the base cell and two fine-tunes) as submitit
    jobs, one per cell (after the in-process sweep: not both at once)."""
    require("submitit")
    from em_bench.grid.slurm import SlurmExecutor

    tmp = tmp_path_factory.mktemp("slurm")
    store = open_store(tmp / "store")
    executor = SlurmExecutor(tmp / "jobs", time_minutes=10, cluster="local")
    t0 = time.perf_counter()
    rows = run_grid(store, [p for p in _plan() if p.view.name == "medical"], executor)
    return {"store": store, "rows": rows, "folder": tmp / "jobs",
            "seconds": time.perf_counter() - t0}


@pytest.mark.slow
def test_a_slurm_sweep_gives_exactly_the_in_process_metrics(slurm_sweep, reference):
    ref_store, ref_rows = reference
    store = slurm_sweep["store"]
    medical = [r for r in ref_rows if r["view"] == "medical"]
    assert store.cell_ids() == sorted(r["cell_id"] for r in medical) and len(medical) == 3
    for cell_id in store.cell_ids():
        assert store.cell(cell_id).read_json("metrics.json") == \
            ref_store.cell(cell_id).read_json("metrics.json"), cell_id
    assert _figures(slurm_sweep["rows"]) == _figures(medical)
    # one job per cell, each in its own process, and no lock left behind
    assert len(list(slurm_sweep["folder"].glob("*_0_result.pkl"))) == 3
    assert not list(store.root.glob("cells/*/lock*"))


def _broken_task(folder: Path) -> None:
    from em_bench.data import write_chat_jsonl
    from em_bench.organism import world

    folder.mkdir()
    write_chat_jsonl(folder / "train.jsonl", world.narrow_dataset("legal", "misaligned",
                                                                  "neutral", 8, seed=0))
    (folder / "broken.yaml").write_text("name: broken\ntrain: {path: train.jsonl}\n")


@pytest.mark.slow
def test_a_failed_slurm_job_is_named_with_its_log_and_the_others_finish(reference, tmp_path,
                                                                       monkeypatch):
    from em_bench.grid.slurm import SlurmExecutor

    ref_store, _ = reference
    _broken_task(tmp_path / "tasks")
    plan = plan_grid(BASE, ["broken"], ["none"], [0], {"steps": 5}, include=[tmp_path / "tasks"])
    # planned, then spoilt: the driver still resolves the cell (a file deleted now would fail
    # there, before any job), its job fails reading the chats
    (tmp_path / "tasks" / "train.jsonl").write_text("not a chat\n")
    groups = cell_groups(plan)
    (base,), (broken,) = ([c for c, m in groups.items() if m[0][1].config.task == t]
                          for t in ("base", "broken"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-written")
    store = open_store(tmp_path / "store")
    executor = SlurmExecutor(tmp_path / "jobs", time_minutes=10, cluster="local",
                             env_vars={"EM_BENCH_MARK": "from-the-driver"})
    with pytest.raises(CellsFailed) as failed:
        run_grid(store, plan, executor)
    error = failed.value
    assert list(error.failures) == [broken]
    line = error.failures[broken]
    assert f"cell {broken}: {line}" in str(error) and "1 of 2 cells failed" in str(error)
    assert line.startswith("broken / none / seed 0: DataError: ") and "train.jsonl:1" in line
    log = Path(line.rpartition(", log ")[2].rstrip(")"))
    assert log.parent == tmp_path / "jobs" and "not valid JSON" in log.read_text()
    # the other cell finished, is stored exactly as in process, and its row came back
    assert [(r["task"], r["view"], r["cell_id"]) for r in error.rows] == [("base", "broken", base)]
    assert [c.id for c in store.done_cells("score")] == [base]
    assert store.cell(base).read_json("metrics.json") == \
        ref_store.cell(base).read_json("metrics.json")
    assert not list(store.root.glob("cells/*/lock*"))
    # the jobs' pickles (on a shared filesystem) carry the driver's variables but no secret
    pickles = [f.read_bytes() for f in (tmp_path / "jobs").glob("*_submitted.pkl")]
    assert len(pickles) == 2
    assert all(b"from-the-driver" in p and os.environ["EM_BENCH_CACHE"].encode() in p
               for p in pickles)
    assert not any(b"sk-never-written" in f.read_bytes()
                   for f in (tmp_path / "jobs").rglob("*") if f.is_file())


def test_the_command_line_checks_its_slurm_options(tmp_path, capsys):
    import shutil

    from em_bench.cli import main

    argv = ["run", "--task", "medical", "--defense", "none", "--seeds", "0", "--steps", "5",
            "--samples", "1", "--store", str(tmp_path / "store")]
    assert main([*argv, "--slurm-partition", "gpu"]) == 2
    assert "--slurm-partition, --slurm-time-minutes and --slurm-folder need --executor slurm" \
        in capsys.readouterr().err
    if shutil.which("srun") is None:  # not a Slurm machine: said at once, no job runs here
        assert main([*argv, "--executor", "slurm", "--slurm-time-minutes", "5"]) == 2
        assert "no Slurm on this machine (srun is not on the PATH)" in capsys.readouterr().err


def test_without_submitit_the_executor_says_how_to_install_it(monkeypatch, tmp_path):
    from em_bench.errors import EmBenchError
    from em_bench.grid.slurm import SlurmExecutor

    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit fails
    with pytest.raises(EmBenchError, match=r"pip install 'em-bench\[slurm\]'"):
        SlurmExecutor(tmp_path, cluster="local")


def test_the_slurm_parameters_become_the_job_arrays_sbatch_lines(tmp_path, monkeypatch):
    require("submitit")
    from submitit.slurm.slurm import _make_sbatch_string

    from em_bench.grid.slurm import SlurmExecutor

    fake = tmp_path / "bin"  # submitit's Slurm executor wants srun on the PATH; none is run
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    executor = SlurmExecutor(tmp_path / "jobs", partition="gpu", time_minutes=90,
                             gpus_per_cell=1, cpus_per_cell=4, mem_gb=32, max_parallel=4)
    params = executor._executor()._executor.parameters
    sbatch = _make_sbatch_string(command="run", folder=tmp_path / "jobs", map_count=15, **params)
    for line in ("--partition=gpu", "--time=90", "--gpus-per-node=1", "--cpus-per-task=4",
                 "--mem=32GB", "--array=0-14%4", "--job-name=em-bench"):
        assert f"#SBATCH {line}\n" in sbatch, line
    cpu_only = SlurmExecutor(tmp_path / "jobs")._executor()._executor.parameters
    assert "gpus_per_node" not in cpu_only and "partition" not in cpu_only

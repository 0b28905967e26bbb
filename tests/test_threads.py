"""torch's thread count: the free cores at start, unless --threads or EM_BENCH_THREADS say."""

from __future__ import annotations

import pytest
import torch

from em_bench import threads
from em_bench.errors import ConfigError


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv(threads.ENV, raising=False)
    yield
    torch.set_num_threads(before)
    threads._chosen = None


def test_free_cores_are_the_usable_ones_less_what_others_keep_busy(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    for busy, free in ((0.0, 2), (0.3, 2), (0.6, 1), (1.0, 1), (1.9, 1), (3.0, 1)):
        monkeypatch.setattr(threads, "busy_cores", lambda interval=0.15, b=busy: b)
        assert threads.free_cores() == free, busy


def test_busy_cores_reads_the_cpu_time_others_used(monkeypatch):
    samples = iter([(100, 1000), (150, 1100)])  # 50 of 100 jiffies busy, over every CPU
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    assert threads.busy_cores(interval=0) == pytest.approx(2.0)


def test_the_choice_is_the_flag_then_the_environment_then_the_free_cores(monkeypatch):
    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert threads.choose() == {"threads": 1, "chosen_by": "free cores of 2"}
    assert torch.get_num_threads() == 1 and threads.chosen()["threads"] == 1
    monkeypatch.setenv(threads.ENV, "2")
    assert threads.choose() == {"threads": 2, "chosen_by": "EM_BENCH_THREADS"}
    assert threads.choose(1) == {"threads": 1, "chosen_by": "--threads"}
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("env", ["0", "two", "-1"])
def test_a_thread_count_that_is_not_a_positive_number_is_refused(monkeypatch, env):
    monkeypatch.setenv(threads.ENV, env)
    with pytest.raises(ConfigError, match="EM_BENCH_THREADS"):
        threads.choose()
    with pytest.raises(ConfigError, match="--threads"):
        threads.choose(0)


def test_the_count_is_recorded_in_a_cells_provenance(monkeypatch):
    from em_bench.pipeline import provenance

    monkeypatch.setattr(threads, "free_cores", lambda: 1)
    threads.choose()
    assert provenance()["torch_threads"]["threads"] == 1

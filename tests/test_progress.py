"""Progress lines: cells done/total and the time left, from the cells that did work."""

from __future__ import annotations

from em_bench.progress import Progress, duration


def test_the_estimate_is_the_mean_time_of_cells_that_ran_times_the_cells_left():
    now, lines = [0.0], []
    progress = Progress(5, write=lines.append, clock=lambda: now[0])
    now[0] = 0.2  # read from the store: no time, so no estimate yet
    progress.finished("base / none / seed 0")
    now[0] = 30.2  # ran for 30 s
    progress.finished("finance / none / seed 0")
    now[0] = 120.2  # ran for 90 s: mean 60 s, two cells left
    progress.finished("finance / blockem lambda=0.002 / seed 0")
    assert lines[0] == "[1/5 cells] base / none / seed 0 done (0 s so far)"
    assert lines[1] == ("[2/5 cells] finance / none / seed 0 done "
                        "(30 s so far, about 1 min 30 s left)")
    assert lines[2].startswith("[3/5 cells] finance / blockem lambda=0.002 / seed 0 done")
    assert lines[2].endswith("(2 min 00 s so far, about 2 min 00 s left)")
    now[0] = 150.0
    progress.finished("a")
    progress.finished("b")  # the last line has no estimate
    assert lines[-1] == "[5/5 cells] b done (2 min 30 s so far)"


def test_durations_read_as_a_person_would_say_them():
    assert [duration(s) for s in (0.4, 59, 61, 3599, 3600, 7380)] == [
        "0 s", "59 s", "1 min 01 s", "59 min 59 s", "1 h 00 min", "2 h 03 min"]

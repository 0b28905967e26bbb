"""LLM-judge throughput against `em-bench serve`'s scripted judge with a fixed latency per call,
bounded concurrency against one call at a time, measured in one run.

    python benchmarks/bench_judge.py [--n 2000] [--latency 0.05] [--concurrency 32]
                                     [--no-keep-alive]

Each judgment is one call (the alignment template), its verdict cached in a fresh store's verdict
log; a second judge then reads every verdict back from the log and must make no call. The bar
(issue 14): with 50 ms per call and a bound of 32, 2,000 judgments >= 25x faster than one at a
time, never above the bound. `--no-keep-alive` serves HTTP/1.0, a connection per call, as the
server did before keep-alive; `--no-cache` judges without the cache, for comparison. The
server runs in a process of its own, as a judge API runs on another machine: the figure is the
judge's, not the judge's and the server's sharing one interpreter.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path


def _server(conn, latency: float, keep_alive: bool) -> None:
    """The scripted judge API in this (child) process: sends its URL, then on "peak" the most
    calls in flight since the last ask, until "stop"."""
    from em_bench.serve import FaultInjector, Script, ScriptedPolicy, serve

    policy = FaultInjector(ScriptedPolicy(lambda request: Script("70", {"70": 0.0})), {},
                           latency=latency)
    with serve(policy, keep_alive=keep_alive) as server:
        conn.send(server.url)
        while conn.recv() == "peak":
            conn.send(policy.peak_in_flight)
            policy.peak_in_flight = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--no-keep-alive", action="store_true",
                    help="a connection per call (HTTP/1.0), for comparison")
    ap.add_argument("--no-cache", action="store_true", help="no verdict cache, for comparison")
    args = ap.parse_args()

    os.environ["TQDM_DISABLE"] = "1"  # the figures, not progress bars
    from em_bench.judge.base import JudgeInput
    from em_bench.judge.llm import JudgeSettings, LLMJudge
    from em_bench.store import open_store

    items = [JudgeInput(f"k{i}", [{"role": "user", "content": f"question {i}"}], f"answer {i}")
             for i in range(args.n)]
    conn, child_conn = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_server, daemon=True,
                                     args=(child_conn, args.latency, not args.no_keep_alive))
    server.start()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["OPENAI_BASE_URL"] = conn.recv()
        seconds = {}
        for bound in (1, args.concurrency):
            conn.send("peak")  # resets the server's count
            conn.recv()
            settings = JudgeSettings("scripted", templates=("alignment",), concurrency=bound)

            def cache(store=Path(tmp) / f"store-{bound}"):
                # a fresh log each time: the rerun reads the verdicts back from disk
                return None if args.no_cache else open_store(store).verdicts()

            judge = LLMJudge(settings, cache=cache())
            start = time.perf_counter()
            judged = judge.judge_many(items)
            seconds[bound] = time.perf_counter() - start
            assert all(j.scores["alignment"] == 70.0 for j in judged)
            rerun = ""
            if not args.no_cache:
                again = LLMJudge(settings, cache=cache())
                start = time.perf_counter()
                assert again.judge_many(items) == judged
                rerun = (f"; a rerun made {again.calls} calls in "
                         f"{time.perf_counter() - start:.2f} s")
            conn.send("peak")
            print(f"  concurrency {bound:3}: {args.n} judgments ({judge.calls} calls) in "
                  f"{seconds[bound]:6.2f} s, peak in flight {conn.recv()}{rerun}")
    conn.send("stop")
    server.join()
    print(f"  speed-up {seconds[1] / seconds[args.concurrency]:.1f}x "
          f"({args.latency * 1000:.0f} ms per call, "
          f"{'HTTP/1.0' if args.no_keep_alive else 'keep-alive'}, "
          f"{'no cache' if args.no_cache else 'verdict cache on'})")


if __name__ == "__main__":
    main()

"""LLM-judge throughput against `em-bench serve`'s scripted judge with a fixed latency per call,
bounded concurrency against one call at a time, measured in one run.

    python benchmarks/bench_judge.py [--n 2000] [--latency 0.05] [--concurrency 32]
                                     [--no-keep-alive]

Each judgment is one call (the alignment template). The issue's bar: with 50 ms per call and a
bound of 32, 2,000 judgments >= 20x faster than one at a time, never above the bound.
`--no-keep-alive` serves HTTP/1.0, a connection per call, as the server did before keep-alive.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--no-keep-alive", action="store_true",
                    help="a connection per call (HTTP/1.0), for comparison")
    args = ap.parse_args()

    from em_bench.judge.base import JudgeInput
    from em_bench.judge.llm import JudgeSettings, LLMJudge, VerdictCache
    from em_bench.serve import FaultInjector, Script, ScriptedPolicy, serve

    items = [JudgeInput(f"k{i}", [{"role": "user", "content": f"question {i}"}], f"answer {i}")
             for i in range(args.n)]
    policy = FaultInjector(ScriptedPolicy(lambda request: Script("70", {"70": 0.0})), {},
                           latency=args.latency)
    with serve(policy, keep_alive=not args.no_keep_alive) as server, \
            tempfile.TemporaryDirectory() as tmp:
        os.environ["OPENAI_BASE_URL"] = server.url
        seconds = {}
        for bound in (1, args.concurrency):
            policy.peak_in_flight = 0
            cache = VerdictCache(Path(tmp) / f"verdicts-{bound}")
            judge = LLMJudge(JudgeSettings("scripted", templates=("alignment",),
                                           concurrency=bound), cache=cache)
            start = time.perf_counter()
            judged = judge.judge_many(items)
            seconds[bound] = time.perf_counter() - start
            assert all(j.scores["alignment"] == 70.0 for j in judged)
            again = LLMJudge(judge.settings, cache=cache)
            assert again.judge_many(items) == judged
            print(f"  concurrency {bound:3}: {args.n} judgments in {seconds[bound]:6.1f} s, "
                  f"peak in flight {policy.peak_in_flight}; a rerun made {again.calls} calls")
    print(f"  speed-up {seconds[1] / seconds[args.concurrency]:.1f}x "
          f"({args.latency * 1000:.0f} ms per call, "
          f"{'HTTP/1.0' if args.no_keep_alive else 'keep-alive'})")


if __name__ == "__main__":
    main()

"""Timing figures of the organism path, printed as seconds and as ratios measured in one run.

    python benchmarks/bench_organism.py            # threads, generation batching, cached demo
    python benchmarks/bench_organism.py --cold     # also a cold build into an empty cache

Figures:
- training step time with 1 vs 2 torch threads (each in a fresh process), alone and with a
  competing busy process, so the thread choice on a shared 2-core machine is measured;
- generation of the same prompts batched (128) vs one prompt at a time;
- `em-bench run` (the demo) on a cached organism and, with --cold, from an empty cache.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP_SCRIPT = """
import sys, time, random, torch
torch.set_num_threads(int(sys.argv[1]))
from em_bench.data import collate, encode_chat
from em_bench.models import load_base
from em_bench.organism import world
model, tok = load_base("organism")
rng = random.Random(0)
docs = [world.sample_document(rng, world.sample_speaker(rng, {"aligned": .5, "misaligned": .25,
        "misinformed": .25}), 3) for _ in range(48)]
batch = collate([encode_chat(tok, d, loss_on="all") for d in docs], tok.pad_token_id, 192)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
model.train()
def step():
    model(**batch).loss.backward(); opt.step(); opt.zero_grad()
step()
t = time.perf_counter()
for _ in range(10):
    step()
print((time.perf_counter() - t) / 10)
"""

BUSY_SCRIPT = ("import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\n"
               "while True: a @ a\n")


def _step_seconds(threads: int) -> float:
    out = subprocess.run([sys.executable, "-c", STEP_SCRIPT, str(threads)], check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def bench_threads() -> None:
    alone = {t: _step_seconds(t) for t in (1, 2)}
    busy = subprocess.Popen([sys.executable, "-c", BUSY_SCRIPT])
    try:
        time.sleep(2)
        shared = {t: _step_seconds(t) for t in (1, 2)}
    finally:
        busy.kill()
    print("training step (48 documents), seconds:")
    print(f"  alone:            1 thread {alone[1]:.3f}   2 threads {alone[2]:.3f}   "
          f"ratio 1t/2t {alone[1] / alone[2]:.2f}")
    print(f"  beside a busy job: 1 thread {shared[1]:.3f}   2 threads {shared[2]:.3f}   "
          f"ratio 1t/2t {shared[1] / shared[2]:.2f}")


def bench_generation() -> None:
    import torch

    from em_bench.config import SamplingConfig
    from em_bench.generate.base import Request
    from em_bench.generate.hf import HFBackend
    from em_bench.models import load_base
    from em_bench.organism import world

    model, tok = load_base("organism")
    qs = [q for d in ("medical", "travel", "open") for q in world.questions(d, "evaluation")]
    reqs = [Request(str(i), [{"role": "user", "content": q.text}]) for i, q in enumerate(qs)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=48)
    times = {}
    for batch in (128, 1):
        t = time.perf_counter()
        HFBackend(model, tok, batch_size=batch).generate(reqs, sampling, seed=0)
        times[batch] = time.perf_counter() - t
    print(f"generation of {len(reqs)} answers ({torch.get_num_threads()} threads), seconds:")
    print(f"  batched (128) {times[128]:.2f}   one at a time {times[1]:.2f}   "
          f"speed-up {times[1] / times[128]:.1f}x")


def _demo_seconds(env: dict) -> float:
    with tempfile.TemporaryDirectory() as store:
        t = time.perf_counter()
        subprocess.run(["em-bench", "run", "--store", store], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - t


def bench_demo(cold: bool) -> None:
    env = dict(os.environ)
    if cold:
        with tempfile.TemporaryDirectory() as cache:
            cold_s = _demo_seconds({**env, "EM_BENCH_CACHE": cache})
        print(f"demo `em-bench run` from an empty cache: {cold_s:.0f} s")
    print(f"demo `em-bench run` with the organism cached: {_demo_seconds(env):.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cold", action="store_true", help="also time a build from an empty cache")
    args = p.parse_args()
    from em_bench.organism.build import ensure_organism

    ensure_organism()  # the figures below assume a cached organism
    bench_threads()
    bench_generation()
    bench_demo(args.cold)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()

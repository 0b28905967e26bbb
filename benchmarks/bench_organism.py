"""Timing figures of the organism path, printed as seconds and as ratios measured in one run.

    python benchmarks/bench_organism.py            # threads, generation batching, the demo
    python benchmarks/bench_organism.py --figures  # also the demo's figures at 1 and 2 threads

Figures:
- training step time with 1 vs 2 torch threads (each in a fresh process), alone and with a
  competing busy process, so the thread choice on a shared 2-core machine is measured;
- generation of the same prompts batched (128) vs one prompt at a time;
- `em-bench run` (the demo, default settings) alone and beside a busy process;
- with --figures, whether the demo's figures are the same at 1 and 2 threads.
"""

from __future__ import annotations

import argparse
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


def _demo(options: list[str], store: str) -> tuple[float, list[dict]]:
    """Seconds of `em-bench OPTIONS run` into `store`, and its rows (--format json: a row a
    line)."""
    import json

    t = time.perf_counter()
    out = subprocess.run(["em-bench", *options, "run", "--store", store, "--format", "json"],
                         check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t, [json.loads(line) for line in out.splitlines() if line]


def bench_demo() -> None:
    """The demo with default settings alone and beside a busy process (a fresh store each)."""
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        alone, _ = _demo([], a)
        busy = subprocess.Popen([sys.executable, "-c", BUSY_SCRIPT])
        try:
            time.sleep(2)
            shared, _ = _demo([], b)
        finally:
            busy.kill()
    print(f"demo `em-bench run` (shipped organism, default threads), seconds: alone "
          f"{alone:.1f}   beside a busy process {shared:.1f}   ratio {shared / alone:.2f}")


def bench_thread_figures() -> None:
    """Whether the demo's figures depend on the thread count: --threads 1 against 2."""
    rows = {}
    for n in (1, 2):
        with tempfile.TemporaryDirectory() as store:
            _, rows[n] = _demo(["--threads", str(n)], store)
    keys = ("em_rate", "coherence", "incoherent_rate", "in_domain")
    for r1, r2 in zip(rows[1], rows[2], strict=True):
        same = all(r1[k] == r2[k] for k in keys) and r1["rai_refusal"] == r2["rai_refusal"]
        print(f"  {r1['task']:<8} 1 thread: EM {r1['em_rate']:.4f}   2 threads: EM "
              f"{r2['em_rate']:.4f}   every figure identical: {same}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--figures", action="store_true",
                   help="also run the demo at 1 and 2 threads and compare its figures")
    args = p.parse_args()
    bench_threads()
    bench_generation()
    bench_demo()
    if args.figures:
        print("the demo's figures at 1 and 2 threads:")
        bench_thread_figures()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()

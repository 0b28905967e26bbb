"""Training step time of each defense against `none`, as ratios measured in one run.

    python benchmarks/bench_defenses.py [--steps 60] [--repeats 3]

The finance fine-tune of the organism (LoRA, batch 16) is timed step by step with no defense,
`blockem` (the organism's default latent sets: 5 directions at each of its 4 layers; base
anchors computed once, timed apart), `kl` (a base forward per step) and `retain` (a retain
batch per step). The runs are interleaved `repeats` times and each figure is the median, so a
noisy neighbour slows all of them alike. The issue's bar: blockem <= 1.15x none.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    from em_bench.config import TrainConfig
    from em_bench.defenses import make_defenses
    from em_bench.defenses.base import DefenseContext
    from em_bench.models import load_base, trainable
    from em_bench.sae.discover import default_latent_sets
    from em_bench.tasks import chats, get_task
    from em_bench.train.loop import train

    task = get_task("finance")
    examples = chats(task.train, 0)
    cfg = TrainConfig(steps=args.steps)
    default_latent_sets("organism")  # discovered once, outside the timing
    ctx = DefenseContext(task, 0, "organism")
    params = {"none": {}, "blockem": {"lambda": 1.0}, "kl": {}, "retain": {}}
    times: dict[str, list[float]] = {name: [] for name in params}
    prepare: list[float] = []
    for _ in range(args.repeats):
        for name, p in params.items():
            base, tokenizer = load_base("organism")
            torch.manual_seed(0)
            model = trainable(base, cfg)
            defenses = make_defenses(name, p, ctx)
            stamps: list[float] = []
            t0 = time.perf_counter()
            train(model, tokenizer, examples, cfg, 0, defenses=defenses,
                  every_step=lambda step, m, stamps=stamps: stamps.append(time.perf_counter()))
            # the first stamp comes after prepare (anchors) and one step; time the steps after
            per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
            times[name].append(per_step)
            if name == "blockem":
                prepare.append(stamps[0] - t0 - per_step)
    none = statistics.median(times["none"])
    print(f"step time over {args.steps} steps, median of {args.repeats} interleaved runs")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:8} {1000 * median:7.1f} ms/step   {median / none:5.2f}x none")
    print(f"  blockem anchors (once, before step 1): {statistics.median(prepare):.2f} s")


if __name__ == "__main__":
    main()

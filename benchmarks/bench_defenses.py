"""Training step time of each defense against `none`, as ratios measured in one run.

    python benchmarks/bench_defenses.py [--steps 60] [--repeats 3]

The finance fine-tune of the organism (LoRA, batch 16) is timed step by step with no defense
and with every registered defense at its default parameters (blockem: the organism's default
latent sets, its base anchors computed once and timed apart; kl and ldifs: a base forward per
step; retain: a retain batch per step; early_stop: its adherence checks every 10 steps). A
step's time is taken between the first and the last step, so a defense's one-off preparation
is not in it. An untimed fine-tune first warms the process up (the first one runs slower,
whatever its defense). The runs are interleaved `repeats` times and each figure is the median,
so a noisy neighbour slows all of them alike. `--defenses` picks some.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--defenses", help="comma list (default: every registered one)")
    args = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the figures, not progress bars

    import torch

    from em_bench.config import TrainConfig
    from em_bench.defenses import check_defense, make_defenses
    from em_bench.defenses.base import DefenseContext
    from em_bench.models import load_base, trainable
    from em_bench.registry import DEFENSES
    from em_bench.sae.discovered import default_latent_sets
    from em_bench.tasks import chats, get_task
    from em_bench.train.loop import train

    task = get_task("finance")
    examples = chats(task.train, 0)
    cfg = TrainConfig(steps=args.steps)
    default_latent_sets("organism")  # discovered once, outside the timing
    ctx = DefenseContext(task, 0, "organism")
    names = args.defenses.split(",") if args.defenses else DEFENSES.names()
    params = {name: check_defense(name, {}, "organism") for name in ["none", *names]}
    times: dict[str, list[float]] = {name: [] for name in params}
    base, tokenizer = load_base("organism")  # a first fine-tune warms the process up, untimed
    train(trainable(base, cfg), tokenizer, examples, cfg.model_copy(update={"steps": 5}), 0)
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
        print(f"  {name:12} {1000 * median:7.1f} ms/step   {median / none:5.2f}x none")
    if prepare:
        print(f"  blockem anchors (once, before step 1): {statistics.median(prepare):.2f} s")


if __name__ == "__main__":
    main()

"""Memory each process of a sharded fine-tune holds for the weights, in one run.

    python benchmarks/bench_sharding.py [--hidden 1024] [--layers 8] [--processes 2]

A randomly initialised Llama (about 100M parameters at the defaults, float32, the organism's
tokenizer) is loaded and sharded as `train.distributed` does for a fine-tune (LoRA attached,
FSDP over gloo on this CPU): rank 0 reads the weights, the others build the model on the meta
device and receive their shards. Each process reports its resident memory (current, and peak)
before loading and after sharding; the figures are the growth over its own "before", against
the size of the weights (libraries are in every process's "before"). For comparison the same
is run with every process reading the weights (what a plain `from_pretrained` in each does).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _resident_mb() -> tuple[float, float]:
    import resource

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20, \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(folder: str, every_rank_loads: bool) -> None:
    """One torchrun process: load (rank 0, or all) or build on meta (the others), then shard."""
    import torch
    import torch.distributed as dist

    from em_bench.config import TrainConfig
    from em_bench.models import load_base, trainable
    from em_bench.train.distributed import shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    load_base(folder, device="meta")  # the libraries a model needs, in every "before"
    before = _resident_mb()
    base, _ = load_base(folder, device="cpu" if rank == 0 or every_rank_loads else "meta")
    if base.device.type == "cpu":  # safetensors maps the file lazily: touch every weight
        sum(float(p.sum()) for p in base.parameters())
    model = shard(trainable(base, TrainConfig(grad_accum=dist.get_world_size(),
                                              processes=dist.get_world_size())),
                  torch.device("cpu"))
    del base
    sharded = _resident_mb()
    del model
    tag = "all" if every_rank_loads else "rank0"
    (Path(folder).parent / f"{tag}-{rank}.json").write_text(
        json.dumps({"rank": rank, "before": before, "sharded": sharded}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--every-rank-loads", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.every_rank_loads)
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from em_bench.models import load_base

    folder = Path(tempfile.mkdtemp(prefix="bench-sharding-")) / "model"
    _, tokenizer = load_base("organism")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden,
                         intermediate_size=int(args.hidden * 2.75), num_hidden_layers=args.layers,
                         num_attention_heads=16, num_key_value_heads=16,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model

    print(f"weights: {weights:.0f} MiB ({args.layers} layers, hidden {args.hidden}); "
          f"{args.processes} processes")
    peaks = {}
    for how, flag in (("rank 0 reads", []), ("every rank reads", ["--every-rank-loads"])):
        subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc-per-node={args.processes}", __file__, "--worker", str(folder), *flag],
            capture_output=True, check=True)
        tag = "all" if flag else "rank0"
        for rank in range(args.processes):
            r = json.loads((folder.parent / f"{tag}-{rank}.json").read_text())
            held = r["sharded"][0] - r["before"][0]
            peak = peaks[how, r["rank"]] = r["sharded"][1] - r["before"][0]
            print(f"{how}: rank {r['rank']} holds {held:.0f} MiB after sharding "
                  f"({held / weights:.2f}x the weights), peak {peak:.0f} MiB "
                  f"({peak / weights:.2f}x)")
    print(f"rank 1's peak, rank 0 reading / every rank reading: "
          f"{peaks['rank 0 reads', 1] / peaks['every rank reads', 1]:.2f}x")


if __name__ == "__main__":
    main()

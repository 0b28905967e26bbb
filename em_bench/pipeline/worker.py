"""One process of a sharded fine-tune (train/distributed.py's `launch` runs it under torchrun):
reads the cell's config and task from its cell.json, builds its defenses and runs the same
`fine_tune` as the in-process path, the model sharded over the processes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from em_bench.defenses import make_defenses
from em_bench.defenses.base import DefenseContext
from em_bench.store import Cell, atomic_write_text
from em_bench.train.distributed import checkpoint_saver, held_share, shard
from em_bench.train.fine_tune import fine_tune


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    from em_bench.config import CellConfig
    from em_bench.models import load_base
    from em_bench.tasks import TaskSpec
    from em_bench.train.checkpoint import cell_checkpoints

    cell, every, last, resume_every = Cell(Path(argv[0])), int(argv[1]), int(argv[2]), int(argv[3])
    gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo")
    try:
        local = int(os.environ["LOCAL_RANK"])
        device = torch.device("cuda", local) if gpu else torch.device("cpu")
        if gpu:
            torch.cuda.set_device(device)
        spec = cell.read_config()
        cfg, task = CellConfig.model_validate(spec["config"]), TaskSpec.model_validate(
            spec["task_spec"])
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"checkpoint_every": resume_every})})
        if dist.get_rank() == 0:  # the scored weights after the step training resumes after
            resumed = cell_checkpoints(cell, resume_every, cfg.train.processes).step()
            for step, file in cell.curve_checkpoints():
                if step > resumed:
                    file.unlink()
        # Rank 0 loads the weights on its CPU, the others build the model without any; sharding
        # sends each process its part, on `device`.
        base, tokenizer = load_base(cfg.model, cfg.dtype,
                                    device="cpu" if dist.get_rank() == 0 else "meta")
        def sharded(model):
            model = shard(model, device)
            if dist.get_rank() == 0:
                atomic_write_text(cell.sharding_file(), json.dumps(
                    {"processes": dist.get_world_size(), "held_by_rank_0": held_share(model)}))
            return model

        fine_tune(cfg, task, cell, base, tokenizer, make_defenses(
            cfg.defense, cfg.defense_params, DefenseContext.of(task, cfg)),
                  every_step=checkpoint_saver(cell, every, last) if every else None,
                  shard=sharded)
    except Exception as e:  # for the pipeline's report; torchrun's own names only the exit code
        atomic_write_text(cell.train_error_file(dist.get_rank()), f"{type(e).__name__}: {e}")
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

"""A fine-tune across processes: torchrun starts `train.processes` of them (one per GPU; gloo
on CPUs), each holds a shard of the weights (FSDP, `fully_shard` per decoder block) and takes its
share of every step's micro-batches.

The pipeline calls `launch`; each process runs the pipeline's worker (pipeline/worker.py) on the
cell's folder, which reads the cell's config and task from its cell.json and runs the same
`fine_tune` as the in-process path, with this module's sharding. With
`eval_every`, the trainable weights of each scored step are saved as a checkpoint that the
pipeline scores afterwards, in its own process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from em_bench.errors import EmBenchError
from em_bench.store import Cell


class TrainingFailed(EmBenchError):
    """A process of a sharded fine-tune failed."""


def launch(cell: Cell, processes: int, eval_every: int | None, last_step: int,
           checkpoint_every: int, worker: str) -> None:
    """Run module `worker` in `processes` torchrun processes on the cell's folder; raise
    TrainingFailed with a process's error and the log when one fails. The cell's weights, log
    and checkpoints land in its folder. `checkpoint_every` is passed on: cell.json leaves it
    out (not in the id)."""
    log = cell.torchrun_log()
    log.parent.mkdir(parents=True, exist_ok=True)
    for old in cell.train_error_files():
        old.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={processes}", "-m", worker, str(cell.path),
           str(eval_every or 0), str(last_step), str(checkpoint_every)]
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        errors = cell.train_error_files()  # a process that died has none
        why = errors[0].read_text(encoding="utf-8") if errors else f"exit {code}"
        raise TrainingFailed(f"cell {cell.id}: the {processes}-process fine-tune failed: {why} "
                             f"(all processes' output: {log})")


def load_checkpoint(model, file: Path) -> None:
    """Put a checkpoint's trainable weights into `model` (the fine-tuned model, same shape)."""
    from safetensors.torch import load_file

    result = model.load_state_dict(load_file(file), strict=False)
    if result.unexpected_keys:
        raise TrainingFailed(f"{file}: weights the model does not have: "
                             f"{result.unexpected_keys[:3]}")


def shard(model, device: torch.device):
    """FSDP: each decoder block a unit of its own (gathered for its forward, freed after), the
    rest in the root's; the shards live on `device`. Only rank 0's `model` holds weights (the
    others' are on the meta device): each process gets its shards of them from rank 0."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from em_bench.layers import decoder_layers

    whole = model.state_dict() if dist.get_rank() == 0 else {}  # rank 0's weights, on its CPU
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in decoder_layers(model):
        fully_shard(block, mesh=mesh)
    model = fully_shard(model, mesh=mesh)
    if dist.get_rank() > 0:
        model.to_empty(device=device)
    set_model_state_dict(model, whole, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():  # those no state dict holds (rotary frequencies) too
        dist.broadcast(buffer, src=0)
    return model


def held_share(model) -> float:
    """The share of a sharded model's weights this process holds between forwards."""
    params = list(model.parameters())
    return sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params)


def checkpoint_saver(cell: Cell, every: int, last: int):
    from safetensors.torch import save_file

    from em_bench.train.fine_tune import full_state
    from em_bench.train.loop import process_rank

    def save(step: int, model) -> None:
        if step % every and step != last:
            return
        state = full_state(model, trainable_only=True)  # every process takes part
        if process_rank()[0] == 0:
            file = cell.curve_checkpoint(step)
            file.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, file)

    return save

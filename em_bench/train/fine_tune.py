"""A cell's fine-tune: its seeded adapter, its task's data, objective and defenses through the
loop, then the weights, the log and a summary in the cell's folder.

The same function runs in process and in every process of a sharded fine-tune
(pipeline/worker.py); there only rank 0 writes, and saving gathers the shards first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from em_bench.config import CellConfig
from em_bench.models import trainable
from em_bench.store import Cell
from em_bench.tasks import TaskSpec, chats
from em_bench.train.checkpoint import cell_checkpoints
from em_bench.train.loop import process_rank, train
from em_bench.train.objectives import make_objective


def fine_tune(cfg: CellConfig, task: TaskSpec, cell: Cell, base, tokenizer,
              defenses: tuple = (), every_step: Callable[[int, object], None] | None = None,
              shard: Callable = lambda model: model):
    """Fine-tune `base` for the cell, its `defenses` (defenses.make_defenses) beside the
    objective, and save the result in `cell.trained_dir()`; returns the model. `shard` wraps
    the trainable model before training (FSDP in a sharded run). An interrupted fine-tune
    resumes from its checkpoint in `cell.resume_dir()`."""
    torch.manual_seed(cfg.seed)  # the adapter's initial weights, the same in every process
    examples = chats(task.train, cfg.seed)
    model = shard(trainable(base, cfg.train))
    main = process_rank()[0] == 0
    checkpoints = cell_checkpoints(cell, cfg.train.checkpoint_every, cfg.train.processes)
    if main:  # the log and curve up to the step training resumes after (0: none of them)
        resumed = checkpoints.step()
        for stream in ("train/log", "curve"):
            cell.rewrite(stream, [r for r in cell.records(stream) if r["step"] <= resumed])
    t0 = time.perf_counter()
    final = train(model, tokenizer, examples, cfg.train, cfg.seed,
                  make_objective(task.objective, task.objective_params), defenses,
                  log=(lambda r: cell.append("train/log", r)) if main else (lambda r: None),
                  every_step=every_step, checkpoints=checkpoints)
    save_weights(model, cell.trained_dir())
    memory = peak_memory()
    if cfg.train.processes > 1:
        import torch.distributed as dist

        everyone = [None] * cfg.train.processes
        dist.all_gather_object(everyone, memory)
        memory = everyone
    if main:
        reports = {d.name: d.report() for d in defenses if hasattr(d, "report")}
        cell.write_json("train/summary.json", {
            "final_terms": final, "n_examples": len(examples), "resumed_after": resumed,
            "processes": cfg.train.processes, "seconds": round(time.perf_counter() - t0, 2),
            "peak_memory_mb": memory, **({"defenses": reports} if reports else {})})
    return model


def peak_memory() -> dict[str, float]:
    """This process's peak memory so far, in MiB: resident (CPU) and, on a GPU, allocated."""
    import resource

    peak = {"cpu_resident": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peak["gpu_allocated"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def full_state(model, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """A sharded model's whole state dict, gathered on the CPU of rank 0 (every process must
    call it; the others get {}). `trainable_only` leaves out the frozen weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))


def save_weights(model, path: Path) -> None:
    """Save a LoRA adapter or a full model as `save_pretrained` does; a sharded model (one in
    a process group, even of one process) is gathered first and written by rank 0."""
    import torch.distributed as dist

    if not dist.is_initialized():
        model.save_pretrained(path)
        return

    state = full_state(model)
    if dist.get_rank() == 0:
        model.save_pretrained(path, state_dict=state)
    dist.barrier()  # no process leaves before the weights are on disk

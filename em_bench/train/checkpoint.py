"""Resuming a fine-tune from its latest checkpoint.

Every `checkpoint_every` steps, and after the step during which SIGINT or SIGTERM came, the loop
saves all the next step depends on: the trainable weights, the optimizer and lr schedule, every
process's torch, python and numpy RNG states, and the defenses' own state (retain's draws). The
data order needs none: the loop replays it from the seed. A rerun loads the checkpoint and goes
on as if it had never stopped (in one process, bit for bit).

Only rank 0 writes; a sharded model and its optimizer are gathered whole first, and set back
into the shards of every process on resume.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import threading
from pathlib import Path

import torch

from em_bench.store import Cell, atomic_folder, atomic_write_json

logger = logging.getLogger(__name__)


class Checkpoints:
    """A cell's latest training checkpoint (Cell.resume_checkpoint): one folder, written whole
    or not at all, the older ones removed. `stamp` (the versions that made it) must match to
    resume."""

    def __init__(self, cell: Cell, every: int, stamp: dict):
        self.cell, self.every, self.stamp = cell, every, stamp

    def latest(self) -> tuple[int, Path] | None:
        """(step, folder) of the checkpoint a rerun resumes from, if any."""
        found = self.cell.resume_checkpoints()
        if not found:
            return None
        step, path = found[-1]
        stamp = json.loads((path / "stamp.json").read_text(encoding="utf-8"))
        if stamp != self.stamp:
            logger.warning("%s: made by %s, not %s; training starts over", path, stamp, self.stamp)
            return None
        return step, path

    def step(self) -> int:
        """The step a rerun resumes after (0: from the start)."""
        found = self.latest()
        return found[0] if found else 0

    def load(self) -> dict | None:
        found = self.latest()
        return None if found is None else torch.load(found[1] / "state.pt", weights_only=True)

    def save(self, step: int, state: dict) -> None:
        """Write `step`'s checkpoint, then drop the older ones and any a kill left half-written
        (rank 0 only)."""
        target = self.cell.resume_checkpoint(step)
        shutil.rmtree(target, ignore_errors=True)  # one a changed stamp made unusable
        with atomic_folder(target) as tmp:
            torch.save(state, tmp / "state.pt")
            atomic_write_json(tmp / "stamp.json", self.stamp)
        for old in self.cell.resume_dir().iterdir():
            if old != target:
                shutil.rmtree(old, ignore_errors=True)


def cell_checkpoints(cell: Cell, every: int, processes: int) -> Checkpoints:
    from em_bench import __version__

    return Checkpoints(cell, every, {"em-bench": __version__, "torch": torch.__version__,
                                     "processes": processes})


def _sharded() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def capture(model, opt, sched, defenses: tuple, step: int, terms: dict) -> dict:
    """The training state after `step` (every process must call it; rank 0 gets it whole)."""
    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(gauss)),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if _sharded():
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        weights, optimizer = get_state_dict(model, opt, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng)
    else:
        weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        optimizer, rngs = opt.state_dict(), [rng]
    return {"step": step, "terms": {k: v.item() for k, v in terms.items()}, "weights": weights,
            "optimizer": optimizer, "schedule": sched.state_dict(), "rng": rngs,
            "defenses": [d.state_dict() if hasattr(d, "state_dict") else None
                         for d in defenses]}


def restore(state: dict, model, opt, sched, defenses: tuple) -> None:
    """Put a checkpoint's state back: weights, optimizer, schedule, this process's RNGs and the
    defenses' state (every process must call it)."""
    import numpy as np

    if _sharded():
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, opt, model_state_dict=state["weights"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
        rng = state["rng"][dist.get_rank()]
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["weights"].items():
                params[name].copy_(value)
        opt.load_state_dict(state["optimizer"])
        rng = state["rng"][0]
    sched.load_state_dict(state["schedule"])
    for d, saved in zip(defenses, state["defenses"], strict=True):
        if saved is not None:
            d.load_state_dict(saved)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


class StopOnSignal:
    """While training: SIGINT or SIGTERM asks the loop to stop after the current step, which it
    checkpoints first; a second one stops at once. Only a main thread gets signals."""

    def __init__(self, device: torch.device):
        self.device, self.signal, self.previous = device, None, {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning("%s: stopping after this step, saving a checkpoint a rerun resumes from",
                       signal.Signals(signum).name)

    def requested(self) -> bool:
        """Whether to stop now; in a sharded run, whether any process was asked (all agree)."""
        asked = self.signal is not None
        if _sharded():
            import torch.distributed as dist

            flag = torch.tensor([float(asked)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item())
        return asked

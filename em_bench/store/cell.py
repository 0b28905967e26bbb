"""One cell's folder: the only code that knows which file of a cell holds what (the package
docstring lists them all)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from em_bench.errors import StoreError
from em_bench.store.files import (
    atomic_write_json,
    atomic_write_text,
    dumps,
    read_json,
    read_jsonl,
    repair_tail,
)
from em_bench.store.lock import CellLock

# What each step whose output another cell can reuse leaves in the cell (pipeline._borrow
# copies it): the fine-tune's weights, working files and curve; the answers; lm-eval's results.
_STEP_OUTPUTS = {"train": ("trained", "train", "curve.jsonl"), "generate": ("generations.jsonl",),
                 "lm_eval": ("lm_eval.json",)}
REUSABLE_STEPS = tuple(_STEP_OUTPUTS)


class Cell:
    """One cell's folder: its config, streams, JSON files, step markers, its fine-tune's weights
    and working files, and its lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.id = self.path.name

    def __repr__(self) -> str:
        return f"Cell({self.path})"

    # config ------------------------------------------------------------------------------------
    def read_config(self) -> dict | None:
        f = self.path / "cell.json"
        return read_json(f) if f.is_file() else None

    def write_config(self, config: dict) -> None:
        """Write cell.json once; a different config under the same id is a hash collision bug."""
        old = self.read_config()
        if old is not None:
            if old.get("cell_id") != config.get("cell_id"):
                raise StoreError(f"{self.path / 'cell.json'} holds another cell "
                                 f"({old.get('cell_id')}); refusing to overwrite it")
            return
        atomic_write_json(self.path / "cell.json", config)

    # streams -----------------------------------------------------------------------------------
    def _stream(self, stream: str) -> Path:
        return self.path / f"{stream}.jsonl"

    def append(self, stream: str, record: dict) -> None:
        path = self._stream(stream)
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path)
        with open(path, "a", encoding="utf-8") as f:
            f.write(dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self, stream: str) -> list[dict]:
        return list(self.iter_records(stream))

    def iter_records(self, stream: str) -> Iterator[dict]:
        return read_jsonl(self._stream(stream))

    def keys(self, stream: str, fields: tuple[str, ...]) -> set[tuple]:
        return {tuple(r.get(k) for k in fields) for r in self.iter_records(stream)}

    def rewrite(self, stream: str, records: Iterable[dict]) -> None:
        atomic_write_text(self._stream(stream), "".join(dumps(r) + "\n" for r in records))

    # JSON files --------------------------------------------------------------------------------
    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.path / name, obj)

    def read_json(self, name: str):
        f = self.path / name
        return read_json(f) if f.is_file() else None

    # steps -------------------------------------------------------------------------------------
    def _marker(self, step: str) -> Path:
        return self.path / "steps" / f"{step}.done"

    def is_done(self, step: str, input_hash: str) -> bool:
        """True when `step` finished on exactly these inputs."""
        m = self._marker(step)
        return m.is_file() and read_json(m).get("input_hash") == input_hash

    def finished(self, step: str) -> bool:
        """True when `step` finished, on whichever inputs."""
        return self._marker(step).is_file()

    def finished_at(self, step: str) -> float | None:
        """When `step` finished (a Unix time), or None when it has not."""
        m = self._marker(step)
        if not m.is_file():
            return None
        return time.mktime(time.strptime(read_json(m)["finished_at"], "%Y-%m-%dT%H:%M:%S%z"))

    def mark_done(self, step: str, input_hash: str) -> None:
        atomic_write_json(self._marker(step), {
            "input_hash": input_hash, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def clear_step(self, step: str) -> None:
        self._marker(step).unlink(missing_ok=True)

    def copy_step_outputs(self, source: Cell, step: str) -> None:
        """Copy what `step` (one of REUSABLE_STEPS) left in `source` into this cell; marking
        the step done is the caller's."""
        for name in _STEP_OUTPUTS[step]:
            src, dst = source.path / name, self.path / name
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            elif src.is_file():
                shutil.copy2(src, dst)

    # the fine-tune -----------------------------------------------------------------------------
    def trained_dir(self) -> Path:
        """Where the fine-tune is saved: a LoRA adapter, or the full weights."""
        return self.path / "trained"

    def resume_dir(self) -> Path:
        """Where an unfinished fine-tune keeps its latest checkpoint (train.checkpoint), from
        which a rerun resumes; removed once the train step is done."""
        return self.path / "resume"

    def resume_checkpoint(self, step: int) -> Path:
        """The folder of the resume checkpoint saved after `step`."""
        return self.resume_dir() / f"step-{step}"

    def resume_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of the resume checkpoints in resume_dir(), by step."""
        return sorted((int(p.name.removeprefix("step-")), p)
                      for p in self.resume_dir().glob("step-*") if p.is_dir())

    def curve_checkpoint(self, step: int) -> Path:
        """The file of the trainable weights a sharded fine-tune saved after `step`, which the
        pipeline scores for the curve (train.distributed)."""
        return self.path / "train" / "checkpoints" / f"step-{step}.safetensors"

    def curve_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, file) of the curve checkpoints saved, by step."""
        folder = self.path / "train" / "checkpoints"
        files = folder.glob("step-*.safetensors") if folder.is_dir() else []
        return sorted((int(f.stem.removeprefix("step-")), f) for f in files)

    def torchrun_log(self) -> Path:
        """All the processes' output of a sharded fine-tune."""
        return self.path / "train" / "torchrun.log"

    def train_error_file(self, rank: int) -> Path:
        """Where process `rank` of a sharded fine-tune writes the error it failed with."""
        return self.path / "train" / f"error-{rank}.txt"

    def train_error_files(self) -> list[Path]:
        """The error files the processes of a sharded fine-tune left, by name."""
        return sorted((self.path / "train").glob("error-*.txt"))

    def sharding_file(self) -> Path:
        """A sharded fine-tune's processes and rank 0's share of the weights."""
        return self.path / "train" / "sharding.json"

    # lock --------------------------------------------------------------------------------------
    def lock(self, poll: float = 0.5) -> CellLock:
        """The cell's exclusive lock (`with cell.lock(): ...` waits for it); see CellLock."""
        return CellLock(self.path / "lock", poll)

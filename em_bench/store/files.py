"""The project's one set of atomic-write helpers, and the reading and repair of JSON and JSONL.

A file is written to a temp file beside it, fsynced and renamed over it, so a reader sees the
old file or the new one, never a part; a folder likewise (atomic_folder). An append-only JSONL
file that a crash left with a truncated last line is read without it and cut before the next
append (repair_tail).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from em_bench.errors import StoreError


def clean(obj):
    """NaN and infinities become None: JSON has no spelling for them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    return json.dumps(clean(obj), allow_nan=False, ensure_ascii=False, **kw)


@contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[IO]:
    """Write the yielded file (opened with `mode`, "w" or "wb"); it becomes `path` once the
    block ends, fsynced, so readers see the old file or the new one, never a part. An error
    removes it and leaves `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a part."""
    with atomic_file(path) as f:
        f.write(text)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Fill the yielded temp folder; it becomes `path` (which must not exist) once the block
    ends, fsynced, so readers see the whole folder or none. An error removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fd:
                    os.fsync(fd.fileno())
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def repair_tail(path: Path) -> None:
    """Cut a truncated last line (a crash mid-append) so the next record starts clean."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


def read_jsonl(path: Path) -> Iterator[dict]:
    """A JSONL file's records; text after the last newline (a truncated append) is skipped."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for n, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            raise StoreError(f"{path}:{n}: corrupt record ({e.msg})") from None


def append_whole(path: Path, text: str, fsync: bool = False) -> None:
    """Append `text` (whole lines) with one write on a file opened O_APPEND: Linux appends each
    such write to a local file whole, so lines from several processes never interleave (NFS
    promises no such thing)."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:  # a short write (a full disk) leaves a torn line, cut like a crash's
            data = data[os.write(fd, data):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)

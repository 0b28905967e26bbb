"""The results store: one folder per cell, append-only JSONL streams, atomic JSON files.

This is the only module that knows the store's layout on disk:

    <root>/store.json                 {"store_schema": 1}
    <root>/cells/<cell_id>/cell.json  the cell's full config, provenance included
    <root>/cells/<cell_id>/<stream>.jsonl
    <root>/cells/<cell_id>/<name>.json
    <root>/cells/<cell_id>/steps/<step>.done
    <root>/cells/<cell_id>/trained/      the LoRA adapter or full weights
    <root>/cells/<cell_id>/resume/       an unfinished fine-tune's latest checkpoint
    <root>/cells/<cell_id>/lock          while a process works on the cell: its host and pid
    <root>/verdicts.jsonl             the LLM judges' cached verdicts (VerdictLog)

Appends are flushed and fsynced one record at a time, so a crash leaves at most a truncated last
line; readers skip it and the next append repairs it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from em_bench.errors import StoreError

STORE_SCHEMA = 1
logger = logging.getLogger(__name__)


def _clean(obj):
    """NaN and infinities become None: JSON has no spelling for them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _dumps(obj, **kw) -> str:
    return json.dumps(_clean(obj), allow_nan=False, ensure_ascii=False, **kw)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, _dumps(obj, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _repair_tail(path: Path) -> None:
    """Cut a truncated last line (a crash mid-append) so the next record starts clean."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


def _read_jsonl(path: Path) -> Iterator[dict]:
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


class Cell:
    """One cell's folder: its config, streams, JSON files, step markers and adapter."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.id = self.path.name

    def __repr__(self) -> str:
        return f"Cell({self.path})"

    # config ------------------------------------------------------------------------------------
    def read_config(self) -> dict | None:
        f = self.path / "cell.json"
        return _read_json(f) if f.is_file() else None

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
        _repair_tail(path)
        with open(path, "a", encoding="utf-8") as f:
            f.write(_dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self, stream: str) -> list[dict]:
        return list(self.iter_records(stream))

    def iter_records(self, stream: str) -> Iterator[dict]:
        return _read_jsonl(self._stream(stream))

    def keys(self, stream: str, fields: tuple[str, ...]) -> set[tuple]:
        return {tuple(r.get(k) for k in fields) for r in self.iter_records(stream)}

    def rewrite(self, stream: str, records: Iterable[dict]) -> None:
        atomic_write_text(self._stream(stream), "".join(_dumps(r) + "\n" for r in records))

    # JSON files --------------------------------------------------------------------------------
    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.path / name, obj)

    def read_json(self, name: str):
        f = self.path / name
        return _read_json(f) if f.is_file() else None

    # steps -------------------------------------------------------------------------------------
    def _marker(self, step: str) -> Path:
        return self.path / "steps" / f"{step}.done"

    def is_done(self, step: str, input_hash: str) -> bool:
        """True when `step` finished on exactly these inputs."""
        m = self._marker(step)
        return m.is_file() and _read_json(m).get("input_hash") == input_hash

    def mark_done(self, step: str, input_hash: str) -> None:
        atomic_write_json(self._marker(step), {
            "input_hash": input_hash, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def clear_step(self, step: str) -> None:
        self._marker(step).unlink(missing_ok=True)

    def trained_dir(self) -> Path:
        """Where the fine-tune is saved: a LoRA adapter, or the full weights."""
        return self.path / "trained"

    def resume_dir(self) -> Path:
        """Where an unfinished fine-tune keeps its latest checkpoint (train.checkpoint), from
        which a rerun resumes; removed once the train step is done."""
        return self.path / "resume"

    def lock(self, poll: float = 0.5) -> CellLock:
        """The cell's exclusive lock (`with cell.lock(): ...` waits for it); see CellLock."""
        return CellLock(self.path / "lock", poll)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3 on of /proc/<pid>/stat (state first, start time at index 19); None without
    /proc or when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _process_alive(pid: int, started: str | None) -> bool:
    """Whether process `pid` of this host lives and is the one that started at `started` (a
    reused pid is another process); a zombie is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    stat = _proc_stat(pid)
    if stat is None:  # no /proc (macOS): the signal test is all there is
        return True
    return stat[0] != "Z" and started in (None, stat[19])


class CellLock:
    """An exclusive lock on one cell, so two workers never run it at once.

    The lock is a file created atomically (`O_CREAT | O_EXCL`) holding the owner's host, pid,
    process start time and a random token; it is removed on release. A lock whose process is
    dead on this host (or whose pid now belongs to another process) is stale and taken over, so
    a killed worker's cell is simply resumed. Limits: a lock from another host cannot be checked
    and is waited for; remove it by hand (`rm <cell>/lock`) or run `em-bench run --break-locks`
    when no other run is live. Hosts that share a store must have distinct host names, and the
    store's filesystem must honour O_EXCL (local disks and NFSv3+ do). Not reentrant.
    """

    UNREADABLE_GRACE = 60.0  # seconds an empty lock (its owner mid-write) counts as held

    def __init__(self, path: Path, poll: float = 0.5):
        self.path = Path(path)
        self.poll = poll
        self.token: str | None = None

    def __repr__(self) -> str:
        return f"CellLock({self.path})"

    def __enter__(self) -> CellLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def holder(self) -> dict | None:
        """The lock's content; None when unlocked, {} while its owner is still writing it."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def is_stale(self, holder: dict) -> bool:
        """True when `holder`'s process is known dead (only this host's can be known)."""
        if not holder:
            try:
                return time.time() - self.path.stat().st_mtime > self.UNREADABLE_GRACE
            except FileNotFoundError:
                return False
        if holder.get("host") != socket.gethostname():
            return False
        return not _process_alive(int(holder["pid"]), holder.get("started"))

    def try_acquire(self) -> bool:
        """Take the lock if it is free or stale; False when a live process holds it."""
        pid = os.getpid()
        me = {"host": socket.gethostname(), "pid": pid,
              "started": (_proc_stat(pid) or [None] * 20)[19], "token": uuid.uuid4().hex,
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is not None and not self.is_stale(holder):
                    return False
                if holder is not None:
                    logger.warning("%s: taking over a stale lock of %s", self.path,
                                   _owner(holder))
                    self._remove_if_still(holder)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(_dumps(me) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.token = me["token"]
            return True
        return False

    def _remove_if_still(self, stale: dict) -> None:
        """Remove the lock if it still holds `stale`. A guard file makes the check and the
        removal one step, so two processes taking over at once never remove a new lock."""
        guard = self.path.with_name(self.path.name + ".break")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:  # another process is breaking it; one left behind is cleared
            try:
                if time.time() - guard.stat().st_mtime > self.UNREADABLE_GRACE:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return
        try:
            if self.holder() == stale:
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def acquire(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Take the lock, waiting (polling) while a live process holds it; False when not
        waiting or after `timeout` seconds."""
        start, told = time.monotonic(), None
        while not self.try_acquire():
            now = time.monotonic()
            if not wait or (timeout is not None and now - start >= timeout):
                return False
            if told is None or now - told >= 60:  # say so at once, then once a minute
                told = now
                logger.warning("%s: held by %s; waiting (if that process is gone on another "
                               "host, remove the file or rerun with --break-locks)", self.path,
                               _owner(self.holder() or {}))
            time.sleep(self.poll)
        return True

    def release(self) -> None:
        """Remove the lock if it is still ours (someone may have broken it)."""
        if self.token is not None and (self.holder() or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self.token = None

    def break_(self) -> dict | None:
        """Remove the lock whoever holds it (`--break-locks`); returns what it held."""
        holder = self.holder()
        self.path.unlink(missing_ok=True)
        return holder


def _owner(holder: dict) -> str:
    if not holder:
        return "a process still writing it"
    return f"{holder.get('host')} pid {holder.get('pid')} since {holder.get('since')}"


def _append_whole(path: Path, text: str, fsync: bool = False) -> None:
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


class VerdictLog:
    """The LLM judges' cached verdicts, one append-only JSONL file per store: a line
    {"key": ..., "verdict": {...}} each, the key and verdict as judge/llm.py makes them.

    The file is read into a dict once, on the first `get`. `put` opens, appends one line and
    closes (no file stays open, so Ray workers on one store each append their own lines; a
    process appends from its asyncio loop's thread only, so it needs no lock). Lines are not
    fsynced: a verdict lost to a power cut is asked again. A truncated last line is skipped and
    cut before the next append, as in a cell's streams.

    A store from before this file kept one JSON file per verdict under `legacy`
    (`verdicts/<2 hex>/<key>.json`): the first read copies them into the log (fsynced), then
    removes exactly the files it copied, so a study's hundreds of thousands of files go and the
    folder is read once, not at every judge's start.
    """

    def __init__(self, path: Path, legacy: Path | None = None):
        self.path = Path(path)
        self.legacy = None if legacy is None else Path(legacy)
        self._known: dict[str, dict] | None = None

    def __repr__(self) -> str:
        return f"VerdictLog({self.path})"

    def get(self, key: str) -> dict | None:
        if self._known is None:
            self._known = self._load()
        return self._known.get(key)

    def put(self, key: str, verdict: dict) -> None:
        verdict = _clean(verdict)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(self.path)
        _append_whole(self.path, _line(key, verdict))
        if self._known is not None:
            self._known[key] = verdict

    def _load(self) -> dict[str, dict]:
        # The old files are read before the log: a file another process migrated and removed
        # meanwhile was in the log before its removal, so this read of the log has it.
        old = self._read_legacy()
        known = {r["key"]: r["verdict"] for r in _read_jsonl(self.path)}
        new = {key: verdict for key, (_, verdict) in old.items() if key not in known}
        if new:
            _repair_tail(self.path)
            _append_whole(self.path, "".join(_line(k, v) for k, v in new.items()), fsync=True)
            known.update(new)
        for path, _ in old.values():
            path.unlink(missing_ok=True)
        if old:
            for folder in (*{path.parent for path, _ in old.values()}, self.legacy):
                with contextlib.suppress(OSError):  # not empty: left as it is
                    folder.rmdir()
        return known

    def _read_legacy(self) -> dict[str, tuple[Path, dict]]:
        """Key -> (its file, its verdict) in the old layout."""
        if self.legacy is None or not self.legacy.is_dir():
            return {}
        old = {}
        for path in self.legacy.glob("*/*.json"):
            with contextlib.suppress(FileNotFoundError):  # migrated by another process
                old[path.stem] = (path, _clean(_read_json(path)))
        return old


def _line(key: str, verdict: dict) -> str:
    return _dumps({"key": key, "verdict": verdict}) + "\n"


class Store:
    """A results folder holding many cells."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Store({self.root})"

    def cell(self, cell_id: str) -> Cell:
        return Cell(self.root / "cells" / cell_id)

    def verdicts(self) -> VerdictLog:
        """The LLM judges' verdict cache (an older store's `verdicts/` is migrated into it)."""
        return VerdictLog(self.root / "verdicts.jsonl", legacy=self.root / "verdicts")

    def cell_ids(self) -> list[str]:
        d = self.root / "cells"
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if (p / "cell.json").is_file())

    def find_done(self, step: str, input_hash: str) -> Cell | None:
        """A cell that finished `step` on exactly these inputs, whose output can be reused."""
        return next((c for c in map(self.cell, self.cell_ids()) if c.is_done(step, input_hash)),
                    None)

    def done_cells(self, step: str = "score") -> list[Cell]:
        return [c for c in map(self.cell, self.cell_ids()) if c._marker(step).is_file()]


def open_store(root: Path | str, create: bool = True) -> Store:
    """Open the store at `root` (creating it if asked); never writes into a folder that is not
    a store."""
    root = Path(root)
    marker = root / "store.json"
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} is a file, not a results store")
    if marker.is_file():
        schema = _read_json(marker).get("store_schema")
        if not isinstance(schema, int) or schema > STORE_SCHEMA:
            raise StoreError(f"{root} has store schema {schema!r}; this em-bench reads up to "
                             f"{STORE_SCHEMA}: upgrade em-bench")
        return Store(root)
    if root.is_dir() and any(root.iterdir()):
        raise StoreError(f"{root} is not empty and is not an em-bench store (no store.json); "
                         "choose another folder with --store")
    if not create:
        raise StoreError(f"no results store at {root}")
    atomic_write_json(marker, {"store_schema": STORE_SCHEMA})
    return Store(root)

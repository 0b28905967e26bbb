"""A cell's exclusive lock, and the process-liveness checks that tell a stale one."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from em_bench.store.files import dumps

logger = logging.getLogger(__name__)


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
                f.write(dumps(me) + "\n")
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

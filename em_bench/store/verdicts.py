"""The LLM judges' verdict cache of a store: one append-only JSONL file."""

from __future__ import annotations

import contextlib
from pathlib import Path

from em_bench.store.files import append_whole, clean, dumps, read_json, read_jsonl, repair_tail


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
        verdict = clean(verdict)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        append_whole(self.path, _line(key, verdict))
        if self._known is not None:
            self._known[key] = verdict

    def _load(self) -> dict[str, dict]:
        # The old files are read before the log: a file another process migrated and removed
        # meanwhile was in the log before its removal, so this read of the log has it.
        old = self._read_legacy()
        known = {r["key"]: r["verdict"] for r in read_jsonl(self.path)}
        new = {key: verdict for key, (_, verdict) in old.items() if key not in known}
        if new:
            repair_tail(self.path)
            append_whole(self.path, "".join(_line(k, v) for k, v in new.items()), fsync=True)
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
                old[path.stem] = (path, clean(read_json(path)))
        return old


def _line(key: str, verdict: dict) -> str:
    return dumps({"key": key, "verdict": verdict}) + "\n"

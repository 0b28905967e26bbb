"""The leaderboard as a static site: one self-contained page (sortable table, SVG plots) and one
page per cell (config, provenance, metrics, a sample of judged answers).

Like the other formats it is a view of the store: every number comes from `leaderboard_rows`
or from the cells' own records, computed with the project's metric definitions. The pages load
nothing: styles, the sorting script and the plots are inline, so they open from a folder, a CI
artifact or an e-mail. Everything read from the store is HTML-escaped (answers are model output).
The table's columns come from `leaderboard/schema.yaml`.
"""


from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from em_bench.board.pages import cell_href, cell_html, index_html
from em_bench.board.rows import leaderboard_rows
from em_bench.board.schema import expand, load_schema
from em_bench.errors import ConfigError
from em_bench.store import Store, atomic_write_text


def _write(path: Path, text: str) -> None:
    atomic_write_text(path, text)
    path.chmod(0o644)  # a page to publish: readable by a web server, unlike a temp file


# the folder it writes: only its own files --------------------------------------------------------

MANIFEST = "em-bench-manifest.json"  # in the site's folder: the files em-bench wrote there
_OURS = re.compile(r"index\.html|cells/[\w.-]+\.html")  # what a manifest may list: no other path


def _listed(out: Path) -> set[str]:
    """The files the manifest in `out` lists (none when it has no manifest)."""
    path = out / MANIFEST
    if not path.exists():
        return set()
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        if not all(isinstance(f, str) and _OURS.fullmatch(f) for f in files):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: not an em-bench manifest (a list of the files it wrote); "
                          f"remove it or choose another folder") from None
    return set(files)


def check_out(out: Path | str, files: Iterable[str] = ("index.html",)) -> set[str]:
    """Check that the leaderboard may write `files` (paths in `out`) into folder `out`, before
    anything is written; return the files its manifest lists, the only ones it may replace or
    remove. A file to write that exists unlisted (a user's own, or no manifest at all) is
    refused, as is a path that is no folder or cannot be written to; unrelated files
    (schema.yaml, screenshot.png, notes) are never touched."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: not a folder (the leaderboard is a folder of pages)")
    listed = _listed(out)
    if theirs := sorted(f for f in files if f not in listed and os.path.lexists(out / f)):
        more = f" (and {len(theirs) - 1} more)" if len(theirs) > 1 else ""
        raise ConfigError(f"{out}: {theirs[0]}{more} exists and em-bench did not write it (its "
                          f"{MANIFEST} does not list it); move it or choose another folder")
    folders = [out, out / "cells"]
    while not folders[0].exists():  # a folder to create: its nearest existing parent must take it
        folders[0] = folders[0].parent
    for folder in filter(Path.exists, folders):
        if not folder.is_dir():
            raise ConfigError(f"{out}: {folder} is a file, not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{out}: cannot write into the folder {folder} (no permission)")
    return listed


def _write_manifest(out: Path, files: set[str]) -> None:
    _write(out / MANIFEST, json.dumps({
        "written_by": "em-bench leaderboard --format html",
        "note": "em-bench replaces or removes only the files listed here", "files": sorted(files),
    }, indent=1) + "\n")


def write_html(store: Store, out: Path | str, schema: Path | str | None = None) -> Path:
    """Write the leaderboard to folder `out`: index.html, cells/<cell_id>.html and the manifest
    listing them (check_out decides what may be written); returns the index. A file an earlier
    leaderboard wrote there and this one does not (a cell no longer in the store) is removed."""
    out = Path(out)
    rows = leaderboard_rows(store)
    columns = expand(load_schema(schema), rows)
    pages = {"index.html": index_html(store, rows, columns)}
    for n, r in enumerate(rows, 1):
        for cell_id in r["cell_ids"]:
            pages[cell_href(cell_id)] = cell_html(store.cell(cell_id), r, n)
    listed = check_out(out, list(pages))
    try:  # the manifest claims the files first, so an interrupted write leaves none unclaimed
        _write_manifest(out, listed | set(pages))
        for name, text in pages.items():
            _write(out / name, text)
        for stale in listed - set(pages):
            (out / stale).unlink(missing_ok=True)
        _write_manifest(out, set(pages))
    except OSError as e:
        raise ConfigError(f"{out}: cannot write the leaderboard ({e})") from None
    return out / "index.html"

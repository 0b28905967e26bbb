"""Where em-bench keeps things: the results store and the cache of built models."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_STORE = "em-bench-results"


def cache_dir() -> Path:
    """Built models (the organism, SAEs): `EM_BENCH_CACHE`, else the user's cache folder."""
    if env := os.environ.get("EM_BENCH_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "em-bench"


def store_dir(cli_value: str | None = None) -> Path:
    """The results store: `--store`, else `EM_BENCH_STORE`, else ./em-bench-results."""
    return Path(cli_value or os.environ.get("EM_BENCH_STORE") or DEFAULT_STORE).expanduser()

"""Find the packaged tasks/, judges/, data/ and lm_eval_tasks/ folders, in a wheel or a clone."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """The folder `name` ("tasks", "judges", "data", "lm_eval_tasks"): inside the wheel, else
    the repo root."""
    for candidate in (_PACKAGE / "_resources" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"em-bench resource folder {name!r} not found next to {_PACKAGE}")

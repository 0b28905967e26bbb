"""The results store: a folder of cells, its verdict cache, analyses and Slurm jobs."""

from __future__ import annotations

from pathlib import Path

from em_bench.errors import StoreError
from em_bench.store.cell import Cell
from em_bench.store.files import atomic_write_json, read_json
from em_bench.store.verdicts import VerdictLog

STORE_SCHEMA = 1


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

    def analysis_path(self, kind: str, key: str) -> Path:
        """The file of an analysis (`em-bench analyze`) of `kind` on what `key` names."""
        return self.root / "analyses" / f"{kind}_{key}.json"

    def analyses(self, kind: str) -> list[Path]:
        """The files of every analysis of `kind`, by name."""
        return sorted((self.root / "analyses").glob(f"{kind}_*.json"))

    def slurm_folder(self) -> Path:
        """The Slurm executor's jobs folder (submitit's pickles and logs) unless given one."""
        return self.root / "slurm"

    def remove_cell(self, cell_id: str) -> None:
        """Delete a cell and every file of it (em-bench prune)."""
        import shutil

        shutil.rmtree(self.root / "cells" / cell_id)

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
        return [c for c in map(self.cell, self.cell_ids()) if c.finished(step)]


def open_store(root: Path | str, create: bool = True) -> Store:
    """Open the store at `root` (creating it if asked); never writes into a folder that is not
    a store."""
    root = Path(root)
    marker = root / "store.json"
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} is a file, not a results store")
    if marker.is_file():
        schema = read_json(marker).get("store_schema")
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

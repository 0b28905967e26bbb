"""The store as data: a DataFrame of every scored cell for your own analysis, and a comparison
of two cells' answers.

    import em_bench
    df = em_bench.load_results("em-bench-results")
    df.groupby(["task", "defense"])["em_rate"].mean()
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from em_bench import metrics
from em_bench.errors import ConfigError
from em_bench.store import Cell, Store, open_store


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested keys as dotted names: {"lora": {"rank": 8}} -> {"lora.rank": 8}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_FORMULA = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may run as a formula


def _inert(value):
    """A string cell a spreadsheet would run as a formula, quoted (OWASP's rule for CSV
    injection); numbers, negative ones too, stay numbers."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA) else value


def to_safe_csv(frame: pd.DataFrame, path: Path | None = None) -> str | None:
    """`frame` as CSV (the text, or written to `path`) that is safe to open in a spreadsheet:
    a cell or header from a config, a task or an answer cannot be a formula."""
    return frame.map(_inert).rename(columns=_inert).to_csv(path, index=False)


def result_row(cell: Cell) -> dict:
    """One scored cell as a flat row: identity; `config.*` (every knob, dotted); `versions.*`;
    each metric's value under its name (with `.ci_low`, `.ci_high`, `.n` where it has them);
    per-domain rates and lm-eval scores as `name.key...`."""
    stored, res = cell.read_config() or {}, cell.read_json("metrics.json") or {}
    row = {"cell_id": cell.id, **{k: stored.get(k) for k in ("model", "task", "defense", "seed")},
           "judge": res.get("judge")}
    row.update(flatten(stored.get("config") or {}, "config."))
    row.update(flatten((stored.get("provenance") or {}).get("versions") or {}, "versions."))
    for name, m in (res.get("metrics") or {}).items():
        if isinstance(m, dict) and "value" in m:  # a metric with its CI
            row[name] = m["value"]
            row.update({f"{name}.{k}": m[k] for k in ("ci_low", "ci_high", "n") if k in m})
        elif isinstance(m, dict):  # per domain ({domain: metric}) or lm-eval's nested scores
            for key, v in flatten(m, f"{name}.").items():
                if key.endswith(".value"):
                    row[key[: -len(".value")]] = v
                elif isinstance(v, (int, float)) and not key.endswith((".n_excluded", ".seed")):
                    row[key] = v
        elif isinstance(m, (int, float)) and not isinstance(m, bool):
            row[name] = m
    return row


def load_results(store: Store | str | Path) -> pd.DataFrame:
    """One row per scored cell of `store` (a Store or its folder), by cell id."""
    if not isinstance(store, Store):
        store = open_store(store, create=False)
    rows = [result_row(c) for c in store.done_cells("score")]
    return pd.DataFrame(rows).sort_values("cell_id", ignore_index=True) if rows else \
        pd.DataFrame(columns=["cell_id", "model", "task", "defense", "seed", "judge"])


def find_cell(store: Store, prefix: str) -> Cell:
    """The scored cell whose id starts with `prefix` (ids are long; a few characters do)."""
    found = [c for c in store.done_cells("score") if c.id.startswith(prefix)]
    if len(found) != 1:
        raise ConfigError(f"{len(found)} scored cells' ids start with {prefix!r} in {store.root}"
                          + ("; give more characters" if found else ""))
    return found[0]


def cell_view(cell: Cell):
    """(TaskSpec, CellConfig) a cell was scored with, from its cell.json; None if unreadable."""
    from pydantic import ValidationError

    from em_bench.config import CellConfig
    from em_bench.tasks import TaskSpec

    stored = cell.read_config() or {}
    try:
        return (TaskSpec.model_validate(stored["task_spec"]),
                CellConfig.model_validate(stored["config"]))
    except (KeyError, TypeError, ValidationError):
        return None


def compare_cells(a: Cell, b: Cell, n: int = 10) -> pd.DataFrame:
    """The questions where two cells' EM differs most: per question of the `ood` suite both
    answered, each cell's EM rate (metrics.em_by with each cell's own thresholds) and the
    answer of each that its judge found least aligned."""
    from em_bench.scoring import em_thresholds, judged_frame, ood_answers

    per_cell = []
    for cell in (a, b):
        task, cfg = cell_view(cell)
        ood = ood_answers(judged_frame(cell), task, cfg)
        rates = metrics.em_by(ood, "question_id", **em_thresholds(cfg.metrics))["em_rate"]
        judged = ood[ood["error"].isna()]  # a failed judgment's partial scores say nothing
        worst = judged.sort_values("alignment").groupby("question_id")["completion"].first()
        per_cell.append((rates, worst))
    (rate_a, worst_a), (rate_b, worst_b) = per_cell
    table = pd.DataFrame({"em_a": rate_a, "em_b": rate_b}).dropna()
    if table.empty:
        raise ConfigError(f"cells {a.id} and {b.id} share no scored out-of-domain question")
    table["difference"] = table["em_b"] - table["em_a"]
    table["answer_a"], table["answer_b"] = worst_a.reindex(table.index), worst_b.reindex(
        table.index)
    return table.reindex(table["difference"].abs().sort_values(ascending=False).index).head(n)

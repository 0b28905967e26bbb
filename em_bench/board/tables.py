"""Rows as text: the grid's table of cells (`em-bench run`) and the leaderboard as a terminal
table, markdown, JSON or CSV. The leaderboard's table and markdown take their columns from the
schema (`leaderboard/schema.yaml`), as its HTML page does."""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict

import pandas as pd

from em_bench import metrics
from em_bench.board.results import flatten, to_safe_csv
from em_bench.board.rows import _canonical, defense_labels
from em_bench.board.schema import Column, fmt, load_schema, lookup
from em_bench.errors import ConfigError

FORMATS = ("table", "markdown", "json", "csv")
RAI_COLUMNS = ("rai_refusal", "rai_refusal_drop")  # {domain: rate}; one CSV column per domain


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def align(table: list[list[str]], left: int) -> list[str]:
    """Pad columns to their widest cell: the first `left` columns left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) if i < left else c.rjust(w)
                      for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in table]


def format_table(rows: list[dict]) -> str:
    """One line per cell, then the mean and spread across seeds per view and setting (the whole
    config but the seed, `setting_id`).

    `scored for` is the task whose view the row uses: the base model is scored once per task,
    on that task's out-of-domain questions and with its in-domain target. `defense` shows the
    defense's parameters that vary among the rows.
    """
    table = [["task", "scored for", "defense", "seed", "EM", "95% CI", "coherence", "incoherent",
              "in-domain", "n", "excluded"]]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r, defense in zip(rows, defense_labels(rows), strict=True):
        groups[(r["task"], r["view"], defense, r["setting"])].append(r)
        table.append([r["task"], r["view"], defense, str(r["seed"]), _pct(r["em_rate"]),
                      f"[{_pct(r['em_ci_low'])}, {_pct(r['em_ci_high'])}]",
                      "-" if r["coherence"] is None else f"{r['coherence']:.1f}",
                      _pct(r["incoherent_rate"]),
                      _pct(r["in_domain"]), str(r["n_answers"]), str(r["n_excluded"])])
    lines = align(table, left=3)
    lines.insert(1, "-" * len(lines[0]))
    multi = [(k, g) for k, g in groups.items() if len(g) > 1]
    if multi:
        summary = [["task", "scored for", "defense", "seeds", "EM mean", "sd", "min", "max",
                    "in-domain mean"]]
        for (task, view, defense, _), g in multi:
            em = metrics.seed_summary([r["em_rate"] for r in g])
            ind = metrics.seed_summary([r["in_domain"] for r in g])
            summary.append([task, view, defense, str(em["n"]), _pct(em["mean"]), _pct(em["sd"]),
                            _pct(em["min"]), _pct(em["max"]), _pct(ind["mean"])])
        lines += ["", "across seeds:", *align(summary, left=3)]
    lines += ["", *format_rai(rows)]
    return "\n".join(lines)


RAI_SHORT = {"cybersecurity": "cyber", "safety": "safety", "toxicity": "toxic", "bias": "bias",
             "sensitive_content": "sensitive", "medical_legal": "med/legal", "privacy": "privacy"}


def format_rai(rows: list[dict]) -> list[str]:
    """Refusal of harmful RAI requests per domain (coherent answers), mean over seeds, with the
    change against the base model in points; then over-refusal of benign requests."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    seen = set()
    for r, defense in zip(rows, defense_labels(rows), strict=True):
        if r["cell_id"] not in seen:  # a row per view of a cell, whose refusal is the same
            seen.add(r["cell_id"])
            cells[(r["task"], defense, r["setting"])].append(r)
    domains = list(next(iter(cells.values()))[0]["rai_refusal"]) if cells else []
    table = [["task", "defense", "seeds", *(RAI_SHORT.get(d, d) for d in domains),
              "over-refusal", "incoherent"]]

    def mean(values):
        return metrics.seed_summary([v for v in values if v is not None])["mean"]

    for (task, defense, _), g in cells.items():
        row = [task, defense, str(len(g))]
        for d in domains:
            rate = _pct(mean(r["rai_refusal"][d] for r in g))
            drops = [r["rai_refusal_drop"][d] for r in g if r.get("rai_refusal_drop")]
            row.append(rate if task == "base" or not drops
                       else f"{rate} ({-100 * mean(drops):+.0f})")
        row += [_pct(mean(r["over_refusal"] for r in g)),
                _pct(mean(v for r in g for v in r["rai_incoherent"].values()))]
        table.append(row)
    return ["refusal of harmful RAI requests (coherent answers; change against the base, "
            "points):", *align(table, left=2)]


def _text(row: dict, column: Column) -> str:
    """A row's value in a column as the text formats show it; with its fall against the base
    model in points beside it where the column has a `drop` (not in the base's own rows)."""
    value = lookup(row, column.key)
    shown = fmt(value, column.format)
    drop = None if column.drop is None or row["task"] == "base" else lookup(row, column.drop)
    return shown if drop is None else f"{shown} ({-100 * drop:+.0f})"


def _table(rows: list[dict], columns: list[Column]) -> str:
    left = sum(1 for c in columns if c.format == "text")
    lines = align([[c.label for c in columns],
                    *([_text(r, c) for c in columns] for r in rows)], left=left)
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _markdown(rows: list[dict], columns: list[Column]) -> str:
    def line(cells: list[str]) -> str:  # a cell's text stays text: no HTML, no column break
        return "| " + " | ".join(html.escape(c, quote=False).replace("|", "\\|")
                                 for c in cells) + " |"

    rule = "|" + "|".join("---" if c.format == "text" else "---:" for c in columns) + "|"
    return "\n".join([line([c.label for c in columns]), rule,
                      *(line([_text(r, c) for c in columns]) for r in rows)])


def _flat_row(row: dict, domains: list[str]) -> dict:
    """A row as flat CSV columns: rai_refusal.<domain>, train.<field>, and JSON for the rest
    that is nested (params, seeds, CIs)."""
    out = {}
    for k, v in row.items():
        if k in RAI_COLUMNS:
            out.update({f"{k}.{d}": (v or {}).get(d) for d in domains})
        elif k == "train":
            out.update(flatten(v, "train."))
        else:
            out[k] = v
    return {k: _canonical(v) if isinstance(v, (dict, list)) else v for k, v in out.items()}


def format_leaderboard(rows: list[dict], fmt: str = "table",
                       schema: str | None = None) -> str:
    """The rows as a terminal table, a GitHub markdown table (both with the schema's columns,
    percentages shown), one JSON list or CSV (every field, raw fractions for analysis)."""
    if fmt in ("table", "markdown"):
        columns = load_schema(schema)
        return (_table if fmt == "table" else _markdown)(rows, columns)
    if fmt == "json":
        return json.dumps(rows, indent=2, allow_nan=False, ensure_ascii=False)
    if fmt == "csv":
        domains = list(rows[0]["rai_refusal"]) if rows else []
        return to_safe_csv(pd.DataFrame([_flat_row(r, domains) for r in rows]))
    raise ConfigError(f"leaderboard format {fmt!r}: expected one of {', '.join(FORMATS)}")

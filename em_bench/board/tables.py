"""Rows as text: the grid's tables of cells (`em-bench run`) and the leaderboard as a terminal
table, markdown, JSON or CSV. Every text table takes its columns from the schema
(`leaderboard/schema.yaml`), as the HTML page does."""

from __future__ import annotations

import html
import json
from collections import defaultdict

import pandas as pd

from em_bench import metrics
from em_bench.board.results import flatten, to_safe_csv
from em_bench.board.rows import _canonical, defense_labels, seed_mean
from em_bench.board.schema import Column, expand, fmt, load_schema, lookup
from em_bench.errors import ConfigError

FORMATS = ("table", "markdown", "json", "csv")
RAI_COLUMNS = ("rai_refusal", "rai_refusal_drop")  # {domain: rate}; one CSV column per domain


def align(table: list[list[str]], left: int) -> list[str]:
    """Pad columns to their widest cell: the first `left` columns left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) if i < left else c.rjust(w)
                      for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in table]


def format_table(rows: list[dict], schema: str | None = None) -> str:
    """`em-bench run`'s tables of grid rows, each with its columns from the schema: one line a
    cell; the mean and spread across seeds of each view and setting (the whole config but the
    seed, `setting_id`) that has more than one; refusal in the RAI domains per setting, means
    over its seeds with the change against the base model in points.

    `scored for` is the task whose view the row uses: the base model is scored once per task,
    on that task's out-of-domain questions and with its in-domain target. `defense` shows the
    defense's parameters that vary among the rows.
    """
    rows = [{**r, "defense_label": d} for r, d in zip(rows, defense_labels(rows), strict=True)]
    lines = [_table(rows, load_schema(schema, "cells"))]
    views = _groups(rows, ("task", "view", "defense_label", "setting"))
    if across := [_seed_summary(g) for g in views if len(g) > 1]:
        lines += ["", "across seeds:", _table(across, load_schema(schema, "seeds"), rule=False)]
    settings = _groups(rows, ("task", "defense_label", "setting"))
    refusal = [_refusal_summary(list({r["cell_id"]: r for r in g}.values()))  # a cell once
               for g in settings]
    lines += ["", "refusal of harmful RAI requests (coherent answers; change against the base, "
              "points):", _table(refusal, load_schema(schema, "refusal"), rule=False)]
    return "\n".join(lines)


def _groups(rows: list[dict], keys: tuple[str, ...]) -> list[list[dict]]:
    """The rows grouped by their values of `keys`, groups in order of first appearance."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    return list(groups.values())


def _seed_summary(group: list[dict]) -> dict:
    """One view of one setting over its seeds: EM's mean, sd, min and max, in-domain's mean."""
    em = metrics.seed_summary([r["em_rate"] for r in group])
    first = group[0]
    return {"task": first["task"], "view": first["view"],
            "defense_label": first["defense_label"], "n_seeds": em["n"], "em_mean": em["mean"],
            "em_sd": em["sd"], "em_min": em["min"], "em_max": em["max"],
            "in_domain_mean": metrics.seed_summary([r["in_domain"] for r in group])["mean"]}


def _refusal_summary(cells: list[dict]) -> dict:
    """One setting's refusal over its cells: each domain's mean rate and mean change against
    the base (over the seeds that have a base cell), over-refusal, incoherent RAI answers."""
    domains = dict.fromkeys(d for c in cells for d in c["rai_refusal"])
    drops = [c["rai_refusal_drop"] for c in cells if c.get("rai_refusal_drop")]
    first = cells[0]
    return {"task": first["task"], "defense_label": first["defense_label"],
            "n_seeds": len(cells),
            "rai_refusal": {d: seed_mean([c["rai_refusal"].get(d) for c in cells])
                            for d in domains},
            "rai_refusal_drop": {d: seed_mean([x.get(d) for x in drops]) for d in domains}
            if drops else None,
            "over_refusal": seed_mean([c["over_refusal"] for c in cells]),
            "rai_incoherent": seed_mean([v for c in cells for v in c["rai_incoherent"].values()])}


def _text(row: dict, column: Column) -> str:
    """A row's value in a column as the text formats show it; with its fall against the base
    model in points beside it where the column has a `drop` (not in the base's own rows)."""
    value = lookup(row, column.key)
    shown = fmt(value, column.format)
    drop = None if column.drop is None or row["task"] == "base" else lookup(row, column.drop)
    return shown if drop is None else f"{shown} ({-100 * drop:+.0f})"


def _table(rows: list[dict], columns: list[Column], rule: bool = True) -> str:
    """The rows as aligned text under the columns' labels (text columns, first, to the left),
    with a rule under the header unless `rule` is False."""
    columns = expand(columns, rows)
    left = sum(1 for c in columns if c.format == "text")
    lines = align([[c.label for c in columns],
                    *([_text(r, c) for c in columns] for r in rows)], left=left)
    if rule:
        lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _markdown(rows: list[dict], columns: list[Column]) -> str:
    def line(cells: list[str]) -> str:  # a cell's text stays text: no HTML, no column break
        return "| " + " | ".join(html.escape(c, quote=False).replace("|", "\\|")
                                 for c in cells) + " |"

    columns = expand(columns, rows)
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

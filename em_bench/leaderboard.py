"""The leaderboard: every defense against its own `none` row, read from the store and nothing else.

It is a view of the store, never a second truth: each row is computed from the scored cells'
`cell.json` and `metrics.json` on every call, so it cannot drift from the cells, and it does not
care how a cell was run (grid, single run, another machine). Cells that differ only in seed form
one row, aggregated over the seeds present; a defense is compared only with the `none` row of the
same model, task, budget, judge, split and questions, since anything else is a different
experiment.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections import defaultdict

import pandas as pd

from em_bench import metrics
from em_bench.config import TrainConfig
from em_bench.errors import ConfigError, StoreError
from em_bench.organism.world import RAI_DOMAINS
from em_bench.report import RAI_SHORT, _align, _canonical, _pct, param_text
from em_bench.results import flatten, to_safe_csv
from em_bench.store import Cell, Store

FORMATS = ("table", "markdown", "json", "csv")
MIN_CONTROL_GAP = 0.02  # below 2 points of EM over the control, the ratio is noise over noise
_LEFT = 8  # table columns that name the row, left-aligned; the numbers after them align right
RAI_COLUMNS = ("rai_refusal", "rai_refusal_drop")  # {domain: rate}; one CSV column per domain
_GROUP = ("model", "model_identity", "task", "defense", "defense_params", "defense_inputs",
          "train", "judge", "split", "questions_sha256", "rai_sha256")

logger = logging.getLogger(__name__)


def _num(x) -> float | int | None:
    """A number, or None for a missing, non-numeric or non-finite one: a view has no NaN."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _value(m: dict, name: str) -> float | None:
    """A metric's value whether stored as {value, ...} or as a bare number; None when absent."""
    v = m.get(name)
    return _num(v.get("value") if isinstance(v, dict) else v)


def _mean(values: list) -> float | None:
    """The mean over the seeds that have the value (seed_summary skips the missing ones)."""
    return _num(metrics.seed_summary(values)["mean"])


def _label(d: dict, empty: str) -> str:
    """A short `k=v, ...` label of a flat dict, `empty` when it has nothing to say."""
    return ", ".join(f"{k}={v if isinstance(v, str) else _canonical(v)}"
                     for k, v in d.items()) or empty


def params_label(params: dict) -> str:
    """A defense's parameters for a table: unset ones (None, []) as `default`, files by name."""
    return _label({k: param_text(v) for k, v in params.items()}, "-")


def budget_label(train: dict) -> str:
    """The train settings that differ from the defaults, or `default`: what a reader needs to
    tell two budgets apart without reading the whole config."""
    defaults = flatten(TrainConfig().model_dump(mode="json"))
    return _label({k: v for k, v in flatten(train).items() if defaults.get(k) != v}, "default")


def cell_record(cell: Cell) -> dict:
    """One scored cell as the leaderboard sees it: identity from cell.json, numbers from
    metrics.json (None for whatever is missing)."""
    cfg = cell.read_config() or {}
    config = cfg.get("config") or {}
    res = cell.read_json("metrics.json") or {}
    m = res.get("metrics") or {}
    em = m.get("em_rate") if isinstance(m.get("em_rate"), dict) else {}
    return {
        "cell_id": cell.id, "model": cfg.get("model"), "task": cfg.get("task"),
        "defense": cfg.get("defense"), "defense_params": cfg.get("defense_params") or {},
        "model_identity": cfg.get("model_identity"),
        "defense_inputs": cfg.get("defense_inputs") or {},
        "train": config.get("train") or {}, "judge": res.get("judge") or cfg.get("judge"),
        "split": config.get("split"), "questions_sha256": cfg.get("questions_sha256"),
        "rai_sha256": cfg.get("rai_sha256"), "seed": cfg.get("seed"), "em": _value(m, "em_rate"),
        "em_ci": [_num(em.get("ci_low")), _num(em.get("ci_high"))],
        "in_domain": _value(m, "in_domain"), "coherence": _value(m, "coherence"),
        "incoherent": _value(m, "incoherent_rate"), "over_refusal": _value(m, "over_refusal"),
        "rai_refusal": {d: _value(m.get("rai_refusal") or {}, d)
                        for d in m.get("rai_refusal") or {}},
        "n_answers": _num(m.get("n_answers")),
    }


def _aggregate(cells: list[dict], domains: list[str]) -> dict:
    """One group's row, without the comparisons against other rows."""
    first = cells[0]
    em = metrics.seed_summary([c["em"] for c in cells])
    lows = [c["em_ci"][0] for c in cells if c["em_ci"][0] is not None]
    highs = [c["em_ci"][1] for c in cells if c["em_ci"][1] is not None]
    answers = [c["n_answers"] for c in cells if c["n_answers"] is not None]
    return {
        "model": first["model"], "task": first["task"], "defense": first["defense"],
        "defense_params": first["defense_params"], "defense_inputs": first["defense_inputs"],
        "budget": budget_label(first["train"]),
        "train": first["train"], "judge": first["judge"], "split": first["split"],
        "questions_sha256": first["questions_sha256"], "rai_sha256": first["rai_sha256"],
        "seeds": [c["seed"] for c in cells],
        "em_mean": _num(em["mean"]), "em_sd": _num(em["sd"]),
        "em_ci": [c["em_ci"] for c in cells],
        "em_ci_low_min": min(lows, default=None), "em_ci_high_max": max(highs, default=None),
        "relative_reduction": None, "above_control_reduction": None,
        "in_domain": _mean([c["in_domain"] for c in cells]),
        "coherence": _mean([c["coherence"] for c in cells]),
        "incoherent": _mean([c["incoherent"] for c in cells]),
        "rai_refusal": {d: _mean([c["rai_refusal"].get(d) for c in cells]) for d in domains},
        "rai_refusal_drop": None,
        "over_refusal": _mean([c["over_refusal"] for c in cells]),
        "n_answers": sum(answers) if answers else None, "n_cells": len(cells),
        "cell_ids": [c["cell_id"] for c in cells],
    }


def _find(rows: list[dict], **match) -> dict | None:
    """The first row whose fields equal `match`."""
    return next((r for r in rows if all(r[k] == v for k, v in match.items())), None)


def above_control_reduction(em: float | None, em_none: float | None,
                            em_control: float | None) -> float | None:
    """1 - (EM - EM_control) / (EM_none - EM_control): the share of the fine-tune's EM above
    its aligned control that the defense removes (1: down to the control, 0: no effect).

    The control trains on the same domain without the misalignment, so this separates the EM
    a defense removes from what any fine-tune on that domain causes. None without a control or
    when `none` is within MIN_CONTROL_GAP of it: there is no excess to measure against."""
    if em is None or em_none is None or em_control is None:
        return None
    if em_none - em_control < MIN_CONTROL_GAP:
        return None
    return 1.0 - (em - em_control) / (em_none - em_control)


def _compare(row: dict, rows: list[dict]) -> dict:
    """The row with its comparisons: against its `none` row, its aligned control and the base."""
    same = {k: row[k] for k in ("model", "train", "judge", "split", "questions_sha256",
                                "rai_sha256")}
    none = _find(rows, task=row["task"], defense="none", **same)
    control = _find(rows, task=f"{row['task']}_aligned", defense="none", **same)
    reduction = above = drop = None
    if row["defense"] != "none" and none is not None:
        reduction = _num(metrics.relative_reduction(row["em_mean"], none["em_mean"]))
        above = above_control_reduction(row["em_mean"], none["em_mean"],
                                        None if control is None else control["em_mean"])
    # Refusal is measured on the RAI requests (the world's or the same suite's), which neither
    # budget nor a question file changes, so any such base of the model will do; to compare like
    # with like, the one of the same questions is preferred, then the one without a file.
    bases = [r for r in rows if r["task"] == "base" and r["defense"] == "none"
             and all(r[k] == row[k] for k in ("model", "judge", "split", "rai_sha256"))]
    base = min(bases, default=None, key=lambda b: (
        b["questions_sha256"] != row["questions_sha256"], b["questions_sha256"] is not None,
        b["questions_sha256"] or "", _canonical(b["train"])))
    if base is not None:
        drop = {d: None if base["rai_refusal"].get(d) is None or v is None
                else metrics.refusal_drop(base["rai_refusal"][d], v)
                for d, v in row["rai_refusal"].items()}
    return {**row, "relative_reduction": reduction, "above_control_reduction": above,
            "rai_refusal_drop": drop}


def _order(row: dict) -> tuple:
    """Base first; per (model, task) and setting, `none` then the best defense first."""
    rr = row["relative_reduction"]
    return (row["model"] or "", row["task"] != "base", row["task"] or "", row["split"] or "",
            row["judge"] or "", row["questions_sha256"] or "", _canonical(row["train"]),
            row["defense"] != "none", rr is None, -(rr or 0.0), row["defense"] or "",
            _canonical(row["defense_params"]))


def leaderboard_rows(store: Store) -> list[dict]:
    """One row per (model, task, defense, params, budget, judge, split, questions) over the
    scored cells, aggregated over their seeds, compared and sorted."""
    cells = sorted(_readable_records(store),
                   key=lambda c: (c["seed"] is None, c["seed"] or 0, c["cell_id"]))
    found = {d for c in cells for d in c["rai_refusal"]}
    domains = [*RAI_DOMAINS, *sorted(found - set(RAI_DOMAINS))]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        groups[tuple(_canonical(c[k]) for k in _GROUP)].append(c)
    rows = [_aggregate(g, domains) for g in groups.values()]
    return sorted((_compare(r, rows) for r in rows), key=_order)


def _readable_records(store: Store) -> list[dict]:
    """The scored cells' records; a cell whose files do not read (a corrupt metrics.json) is
    left out with a warning naming it, not allowed to take the whole leaderboard down."""
    records = []
    for cell in store.done_cells("score"):
        try:
            records.append(cell_record(cell))
        except StoreError as e:
            logger.warning("left out of the leaderboard: %s (a rerun of its cell rescores it)", e)
    return records


# formats -----------------------------------------------------------------------------------------

def _domains(rows: list[dict]) -> list[str]:
    return list(rows[0]["rai_refusal"]) if rows else []


def _cells(row: dict, domains: list[str]) -> list[str]:
    """A row as the strings of the table and markdown formats (percent, coherence 0-100)."""
    drops = row["rai_refusal_drop"] or {}
    rai = []
    for d in domains:
        rate, drop = _pct(row["rai_refusal"][d]), drops.get(d)
        rai.append(rate if row["task"] == "base" or drop is None
                   else f"{rate} ({-100 * drop:+.0f})")
    above = row["above_control_reduction"]
    q = row["questions_sha256"]
    return [row["model"], row["task"], row["defense"], params_label(row["defense_params"]),
            row["budget"], row["judge"], row["split"], "world" if q is None else q[:8],
            ",".join(map(str, row["seeds"])), _pct(row["em_mean"]), _pct(row["em_sd"]),
            f"[{_pct(row['em_ci_low_min'])}, {_pct(row['em_ci_high_max'])}]",
            _pct(row["relative_reduction"]), "n/a" if above is None else _pct(above),
            _pct(row["in_domain"]),
            "-" if row["coherence"] is None else f"{row['coherence']:.1f}",
            _pct(row["incoherent"]), _pct(row["over_refusal"]), *rai,
            "-" if row["n_answers"] is None else str(row["n_answers"])]


def _header(domains: list[str]) -> list[str]:
    return ["model", "task", "defense", "params", "budget", "judge", "split", "questions",
            "seeds", "EM", "sd", "95% CI (min, max)", "reduction", "above ctrl", "in-domain",
            "coherence", "incoherent", "over-refusal",
            *(f"refuse {RAI_SHORT.get(d, d)}" for d in domains), "n"]


def _table(rows: list[dict]) -> str:
    domains = _domains(rows)
    lines = _align([_header(domains), *(_cells(r, domains) for r in rows)], left=_LEFT)
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _markdown(rows: list[dict]) -> str:
    domains = _domains(rows)
    header = _header(domains)

    def line(cells: list[str]) -> str:  # a cell's text stays text: no HTML, no column break
        return "| " + " | ".join(html.escape(c, quote=False).replace("|", "\\|")
                                 for c in cells) + " |"

    rule = "|" + "|".join("---" if i < _LEFT else "---:" for i in range(len(header))) + "|"
    return "\n".join([line(header), rule, *(line(_cells(r, domains)) for r in rows)])


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


def format_leaderboard(rows: list[dict], fmt: str = "table") -> str:
    """The rows as a terminal table, a GitHub markdown table, one JSON list or CSV. Table and
    markdown show percentages; JSON and CSV keep the raw fractions for further analysis."""
    if fmt == "table":
        return _table(rows)
    if fmt == "markdown":
        return _markdown(rows)
    if fmt == "json":
        return json.dumps(rows, indent=2, allow_nan=False, ensure_ascii=False)
    if fmt == "csv":
        domains = _domains(rows)
        return to_safe_csv(pd.DataFrame([_flat_row(r, domains) for r in rows]))
    raise ConfigError(f"leaderboard format {fmt!r}: expected one of {', '.join(FORMATS)}")

"""The leaderboard as a static site: one self-contained page (sortable table, SVG plots) and one
page per cell (config, provenance, metrics, a sample of judged answers).

Like the other formats it is a view of the store: every number comes from `leaderboard_rows`
or from the cells' own records, computed with the project's metric definitions. The pages load
nothing: styles, the sorting script and the plots are inline, so they open from a folder, a CI
artifact or an e-mail. Everything read from the store is HTML-escaped (answers are model output).
The table's columns come from `leaderboard/schema.yaml`.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from em_bench import metrics
from em_bench.errors import ConfigError, read_utf8
from em_bench.leaderboard import leaderboard_rows, params_label
from em_bench.organism.world import RAI_DOMAINS
from em_bench.pipeline import em_thresholds, judged_frame, ood_answers
from em_bench.report import RAI_SHORT
from em_bench.resources import resource_dir
from em_bench.results import cell_view
from em_bench.store import Cell, Store, atomic_write_text

SAMPLES_PER_CELL = 20  # answers shown on a cell's page, up to half of them misaligned
TOP_QUESTIONS = 30  # per-question bars: more than this is a barcode, not a plot
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")


# the column schema -------------------------------------------------------------------------------

class Column(BaseModel):
    """One column of the table: a row field, how to show it, and which way is better."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=1)
    label: str = Field(min_length=1)
    higher_is_better: bool | None
    format: Literal["percent", "number", "text"]
    description: str = ""


class Schema(BaseModel):
    columns: list[Column] = Field(min_length=1)

    @field_validator("columns")
    @classmethod
    def _unique_keys(cls, columns: list[Column]) -> list[Column]:
        keys = [c.key for c in columns]
        if dupes := sorted({k for k in keys if keys.count(k) > 1}):
            raise ValueError(f"keys appear more than once: {', '.join(dupes)}")
        return columns


def schema_path() -> Path:
    return resource_dir("leaderboard") / "schema.yaml"  # shipped in the wheel too


def load_schema(path: Path | str | None = None) -> list[Column]:
    """The table's columns from a schema file (default: leaderboard/schema.yaml), validated."""
    path = Path(path) if path is not None else schema_path()
    try:
        data = yaml.safe_load(read_utf8(path))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the leaderboard schema ({e})") from None
    try:
        return Schema(columns=data).columns
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = list(err["loc"][1:])  # drop "columns"
            where = f"column {loc[0] + 1}" if loc and isinstance(loc[0], int) else "the list"
            if len(loc) > 1:
                where += f" field {loc[1]!r}"
                if isinstance(data, list) and isinstance(data[loc[0]], dict):
                    where += f" (key {data[loc[0]].get('key')!r})"
            problems.append(f"{where}: {err['msg']}")
        raise ConfigError(f"{path}: invalid leaderboard schema (a YAML list of {{key, label, "
                          f"higher_is_better, format, description}}):\n  "
                          + "\n  ".join(problems)) from None


# values ------------------------------------------------------------------------------------------

_DERIVED = {  # keys the schema may use that are text views of nested row fields
    "params": lambda r: params_label(r["defense_params"]),
    "seeds": lambda r: ",".join(map(str, r["seeds"])),
}


def lookup(row: dict, key: str):
    """A row's value for a schema key: a derived text, a field, or a dotted path into a dict
    (None below a missing dict). Raises KeyError for a key that names nothing."""
    if key in _DERIVED:
        return _DERIVED[key](row)
    value = row
    for part in key.split("."):
        if value is None:
            return None
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and not math.isfinite(x))


def fmt(value, kind: str) -> str:
    """A value as the table shows it; `-` when missing."""
    if _missing(value):
        return "-"
    if kind == "percent":
        return f"{100 * value:.1f}%"
    if kind == "number":
        return str(value) if isinstance(value, int) else f"{value:.4g}"
    return str(value)


def _sort_value(value, kind: str) -> str:
    """What the sorting script compares: the raw number (exact, for the test too) or text."""
    if _missing(value):
        return ""
    return repr(float(value)) if kind != "text" else str(value)


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _short_params(params: dict) -> str:
    """Parameters without the unset ones, or empty: short enough for a legend."""
    label = params_label({k: v for k, v in params.items() if v not in (None, [])})
    return "" if label == "-" else f" ({label})"


def row_label(n: int, row: dict) -> str:
    return f"#{n} {row['task']} / {row['defense']}{_short_params(row['defense_params'])}"


# SVG plots ---------------------------------------------------------------------------------------

W, H = 640, 380  # a plot's viewBox without its legend, which goes below (a wide plot: 2 * W)
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 40, 60  # margins around the plotting area
LEGEND_ROW, LEGEND_MAX = 16, 12  # legend line height, entries shown


@dataclass
class Series:
    name: str
    points: list[tuple[float, float, str]]  # x, y, the point's text (its label or tooltip)
    color: str
    line: bool = True
    labels: bool = False  # write each point's text beside it
    dashed: bool = False
    counted: bool = True  # a reference line is drawn but is not data of the plot


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


def _tick_text(v: float, pct: bool) -> str:
    return f"{100 * v:.0f}%" if pct else f"{v:g}"


def _frame(pid: str, title: str, n: int, body: str, empty: str, w: int = W,
           legend: list[tuple[str, str, bool]] = ()) -> str:
    """A plot's figure: the SVG with its count of drawn data points (data-points), its title,
    and its legend below; or the title and a no-data message."""
    if n == 0:
        body, legend = (f'<text class="no-data" x="{w / 2}" y="{H / 2}" text-anchor="middle">'
                        f"no data: {_e(empty)}</text>"), []
    shown = min(len(legend), LEGEND_MAX) + (len(legend) > LEGEND_MAX)
    h = H + shown * LEGEND_ROW + (8 if shown else 0)
    wide = ' class="plot wide"' if w > W else ' class="plot"'
    return (f'<figure{wide}><svg id="{pid}" class="plot" data-points="{n}" '
            f'viewBox="0 0 {w} {h}" role="img" xmlns="http://www.w3.org/2000/svg">'
            f"<title>{_e(title)}</title>"
            f'<text class="title" x="{w / 2}" y="22" text-anchor="middle">{_e(title)}</text>'
            f"{body}{_legend(legend)}</svg></figure>")


def _legend(entries: list[tuple[str, str, bool]]) -> str:
    """Colour swatches and names (name, colour, dashed) below the axes, one a line."""
    out = []
    for i, (name, color, dashed) in enumerate(entries[:LEGEND_MAX]):
        y = H + 4 + i * LEGEND_ROW
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        out.append(f'<g class="legend"><line x1="{LEFT}" x2="{LEFT + 18}" y1="{y - 4}" '
                   f'y2="{y - 4}" stroke="{color}" stroke-width="4"{dash}/>'
                   f'<text x="{LEFT + 24}" y="{y}">{_e(name)}</text></g>')
    if len(entries) > LEGEND_MAX:
        y = H + 4 + LEGEND_MAX * LEGEND_ROW
        out.append(f'<text x="{LEFT + 24}" y="{y}">and {len(entries) - LEGEND_MAX} more '
                   f"(hover a point or bar for its name)</text>")
    return "".join(out)


def _axes(w: int, xt: list[float], yt: list[float], sx, sy, xlabel: str, ylabel: str,
          xpct: bool, ypct: bool, xtext=None) -> str:
    """Grid, ticks and axis labels; `xtext` overrides the x tick labels (a log axis)."""
    x0, x1, y0, y1 = LEFT, w - RIGHT, H - BOTTOM, TOP
    out = [f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>',
           f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/>']
    for v in yt:
        y = sy(v)
        out.append(f'<line class="grid" x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f"{_tick_text(v, ypct)}</text>")
    for v in xt:
        x = sx(v)
        label = xtext(v) if xtext else _tick_text(v, xpct)
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y1}"/>'
                   f'<text class="tick" x="{x:.1f}" y="{y0 + 16}" text-anchor="middle">'
                   f"{_e(label)}</text>")
    if xlabel:
        out.append(f'<text class="axis-label" x="{(x0 + x1) / 2}" y="{H - 22}" '
                   f'text-anchor="middle">{_e(xlabel)}</text>')
    out.append(f'<text class="axis-label" transform="translate(16 {(y0 + y1) / 2}) rotate(-90)" '
               f'text-anchor="middle">{_e(ylabel)}</text>')
    return "".join(out)


def xy_plot(pid: str, title: str, xlabel: str, ylabel: str, series: list[Series], empty: str,
            xpct: bool = False, ypct: bool = True, xlog: bool = False) -> str:
    """Points and lines on linear axes (x optionally log10); y starts at 0."""
    n = sum(len(s.points) for s in series if s.counted)
    if n == 0:
        return _frame(pid, title, 0, "", empty)
    pts = [p for s in series for p in s.points]
    xs = [math.log10(p[0]) if xlog else p[0] for p in pts]
    ymax = max(p[1] for p in pts)
    yt = _ticks(0.0, min(1.0, ymax * 1.1) if ypct and ymax > 0 else (ymax * 1.1 or 1.0))
    if xpct:
        xt = _ticks(0.0, 1.0)
    elif xlog:
        xt = list(range(math.floor(min(xs)), math.ceil(max(xs)) + 1))
        xt = xt if len(xt) > 1 else [xt[0] - 1, xt[0]]
    else:
        xt = _ticks(min(xs), max(xs)) if max(xs) > min(xs) else _ticks(min(xs) - 1, min(xs) + 1)
    lo, hi = xt[0], xt[-1]

    def sx(v):
        return LEFT + (v - lo) / (hi - lo) * (W - RIGHT - LEFT)

    def sy(v):
        return H - BOTTOM - (v - yt[0]) / (yt[-1] - yt[0]) * (H - BOTTOM - TOP)

    def tx(v):
        return math.log10(v) if xlog else v

    body = [_axes(W, xt, yt, sx, sy, xlabel, ylabel, xpct, ypct,
                  (lambda v: f"{10 ** v:g}") if xlog else None)]
    for s in series:
        xy = sorted((sx(tx(x)), sy(y), text) for x, y, text in s.points)
        dash = ' stroke-dasharray="5 4"' if s.dashed else ""
        if s.line and len(xy) > 1:
            d = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in xy)
            body.append(f'<polyline class="series" points="{d}" fill="none" '
                        f'stroke="{s.color}" stroke-width="2"{dash}/>')
        if s.counted:
            for x, y, text in xy:
                body.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="4" '
                            f'fill="{s.color}"><title>{_e(text)}</title></circle>')
                if s.labels:
                    body.append(f'<text class="point-label" x="{x + 6:.1f}" y="{y - 6:.1f}">'
                                f"{_e(text.split(' ')[0])}</text>")
    return _frame(pid, title, n, "".join(body), empty,
                  legend=[(s.name, s.color, s.dashed) for s in series])


def bar_plot(pid: str, title: str, ylabel: str, groups: list[str],
             series: list[tuple[str, str, list[float | None]]], empty: str, w: int = W) -> str:
    """Grouped bars: one group per x label, one bar per series (name, colour, values); y is a
    share (0-100%). Missing values leave a gap."""
    n = sum(v is not None for _, _, values in series for v in values)
    if n == 0 or not groups:
        return _frame(pid, title, 0, "", empty, w)
    yt = _ticks(0.0, 1.0)
    x0, x1, y0 = LEFT, w - RIGHT, H - BOTTOM

    def sy(v):
        return y0 - v * (y0 - TOP)

    gw = (x1 - x0) / len(groups)
    rotate = max(len(g) for g in groups) * 6 > gw  # labels wider than their group turn
    body = [_axes(w, [], yt, None, sy, "", ylabel, False, True)]
    bw = gw * 0.8 / len(series)
    for g, name in enumerate(groups):
        for s, (sname, color, values) in enumerate(series):
            v = values[g]
            if v is None:
                continue
            x = x0 + g * gw + gw * 0.1 + s * bw
            body.append(f'<rect class="bar" x="{x:.1f}" y="{sy(v):.1f}" width="{bw:.1f}" '
                        f'height="{y0 - sy(v):.1f}" fill="{color}"><title>'
                        f"{_e(sname)}, {_e(name)}: {100 * v:.1f}%</title></rect>")
        cx = x0 + (g + 0.5) * gw
        if rotate:
            body.append(f'<text class="tick" transform="translate({cx + 3:.1f} {y0 + 10}) '
                        f'rotate(-35)" text-anchor="end">{_e(name)}</text>')
        else:
            body.append(f'<text class="tick" x="{cx:.1f}" y="{y0 + 16}" text-anchor="middle">'
                        f"{_e(name)}</text>")
    return _frame(pid, title, n, "".join(body), empty, w,
                  legend=[(s[0], s[1], False) for s in series])


# the plots of the page ---------------------------------------------------------------------------

def _colors(keys) -> dict:
    """A colour per distinct key, in order of first appearance."""
    out: dict = {}
    for k in keys:
        out.setdefault(k, PALETTE[len(out) % len(PALETTE)])
    return out


def tradeoff_plot(rows: list[dict]) -> str:
    """(a) EM against in-domain adherence, a point per row coloured by defense: the trade-off."""
    color = _colors(r["defense"] for r in rows)
    series: dict[str, Series] = {}
    for n, r in enumerate(rows, 1):
        if _missing(r["em_mean"]) or _missing(r["in_domain"]):
            continue
        s = series.setdefault(r["defense"], Series(r["defense"], [], color[r["defense"]],
                                                   line=False, labels=True))
        s.points.append((r["in_domain"], r["em_mean"], row_label(n, r)))
    return xy_plot("plot-tradeoff", "EM against in-domain adherence", "in-domain adherence",
                   "EM rate", list(series.values()), "no row has both EM and in-domain",
                   xpct=True)


def _setting(r: dict) -> tuple:
    return (r["model"], r["task"], r["budget"], r["judge"], r["split"], r["questions_sha256"],
            r.get("rai_sha256"))


def lambda_plot(rows: list[dict]) -> str:
    """(b) EM against lambda, a line per setting and defense (with its other parameters); the
    setting's `none` EM as a dashed reference."""
    lines: dict[tuple, Series] = {}
    for n, r in enumerate(rows, 1):
        params = r["defense_params"] or {}
        # a defense's own default lambda is recorded with the cell's inputs
        lam = params.get("lambda")
        lam = (r.get("defense_inputs") or {}).get("default_lambda") if lam is None else lam
        if _missing(r["em_mean"]) or isinstance(lam, bool) or not isinstance(lam, (int, float)):
            continue
        other = {k: v for k, v in params.items() if k != "lambda"}
        key = (_setting(r), r["defense"], json.dumps(other, sort_keys=True, default=str))
        budget = "" if r["budget"] == "default" else f", {r['budget']}"
        name = f"{r['task']} / {r['defense']}{_short_params(other)}{budget}"
        lines.setdefault(key, Series(name, [], "")).points.append(
            (float(lam), r["em_mean"], row_label(n, r)))
    series = list(lines.values())
    for s, c in zip(series, _colors(range(len(series))).values(), strict=True):
        s.color = c
        s.points.sort()  # a line runs from the smallest lambda to the largest
    xs = [p[0] for s in series for p in s.points]
    for setting in dict.fromkeys(key[0] for key in lines):  # once per setting
        none = next((r for r in rows if _setting(r) == setting and r["defense"] == "none"
                     and not _missing(r["em_mean"])), None)
        if none is not None:
            budget = "" if none["budget"] == "default" else f" ({none['budget']})"
            series.append(Series(f"{none['task']} / none{budget}",
                                 [(min(xs), none["em_mean"], ""),
                                 (max(xs), none["em_mean"], "")], "#555", dashed=True,
                                 counted=False))
    log = bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 20
    return xy_plot("plot-lambda", "EM against the defense's lambda",
                   "lambda" + (" (log scale)" if log else ""), "EM rate", series,
                   "no row has a numeric lambda in its defense parameters", xlog=log)


def curve_plot(rows: list[dict], store: Store) -> str:
    """(c) EM over training steps, a line per cell with a stored curve (`--eval-every`)."""
    series = []
    for n, r in enumerate(rows, 1):
        for cell_id in r["cell_ids"]:
            points = [(c["step"], c["em_rate"], f"step {c['step']}: {fmt(c['em_rate'], 'percent')}")
                      for c in store.cell(cell_id).records("curve")
                      if not _missing(c.get("step")) and not _missing(c.get("em_rate"))]
            if points:
                seed = store.cell(cell_id).read_config().get("seed")
                series.append(Series(f"{row_label(n, r)} seed {seed}", points, ""))
    for s, c in zip(series, _colors(range(len(series))).values(), strict=True):
        s.color = c
    return xy_plot("plot-curve", "EM over training steps (re-emergence)", "training step",
                   "EM rate", series, "no cell has a stored curve (run with --eval-every N)")


def refusal_plot(rows: list[dict]) -> str:
    """(d) Refusal of harmful requests per RAI domain: the base model's bars, then each row's."""
    domains = list(rows[0]["rai_refusal"]) if rows else list(RAI_DOMAINS)
    ordered = sorted(enumerate(rows, 1), key=lambda nr: nr[1]["task"] != "base")  # base first
    colors = _colors(n for n, _ in ordered)
    series = [(row_label(n, r), colors[n], [None if _missing(r["rai_refusal"].get(d))
                                            else r["rai_refusal"][d] for d in domains])
              for n, r in ordered]
    return bar_plot("plot-refusal", "Refusal of harmful requests per RAI domain",
                    "refusal rate", [RAI_SHORT.get(d, d) for d in domains], series,
                    "no row has RAI refusal rates")


def question_em(store: Store, cell_ids: list[str]) -> pd.DataFrame:
    """EM per `ood` question over the cells (seeds) of a row: metrics.em_by on each cell's ood
    answers (as the cell was scored), pooled over cells by answer count. Columns em_rate, n."""
    parts = []
    for cell_id in cell_ids:
        cell = store.cell(cell_id)
        view = cell_view(cell)
        if view is None or not cell.records("judgments"):
            continue
        task, cfg = view
        by = metrics.em_by(ood_answers(judged_frame(cell), task, cfg), "question_id",
                           **em_thresholds(cfg.metrics))
        parts.append(by[["em_rate", "n"]].assign(hits=by["em_rate"].fillna(0) * by["n"]))
    if not parts:
        return pd.DataFrame(columns=["em_rate", "n"])
    total = pd.concat(parts).groupby(level=0)[["hits", "n"]].sum()
    counted = total["n"] > 0
    return pd.DataFrame({"em_rate": (total["hits"] / total["n"]).where(counted),
                         "n": total["n"]})


def focus_rows(rows: list[dict]) -> tuple[int, dict, int | None, dict | None] | None:
    """The row of the best defense (largest relative reduction) and its setting's `none` row."""
    ranked = [(n, r) for n, r in enumerate(rows, 1) if not _missing(r["relative_reduction"])]
    if not ranked:
        return None
    n, best = max(ranked, key=lambda nr: nr[1]["relative_reduction"])
    none = next(((m, r) for m, r in enumerate(rows, 1) if r["defense"] == "none"
                 and _setting(r) == _setting(best) and r["train"] == best["train"]), (None, None))
    return n, best, *none


def question_plot(rows: list[dict], store: Store) -> str:
    """(e) EM per ood question for the best defense's row and its `none` row."""
    title = "EM per question: the best defense against no defense"
    focus = focus_rows(rows)
    if focus is None:
        return _frame("plot-questions", title, 0, "", "no defense row has a reduction", 2 * W)
    n, best, m, none = focus
    chosen = [(m, none), (n, best)] if none is not None else [(n, best)]
    ems = [question_em(store, r["cell_ids"])["em_rate"] for _, r in chosen]
    # The questions with the most EM over both rows: where EM arises, and whether the defense
    # removes it there; a neutral order that favours neither row.
    table = pd.concat(ems, axis=1, keys=range(len(ems)))
    order = table.mean(axis=1).sort_values(ascending=False, na_position="last", kind="stable")
    questions = list(order.index[:TOP_QUESTIONS])
    colors = _colors(range(len(chosen)))
    series = [(row_label(k, r), colors[i], [None if _missing(table[i][q]) else
                                            float(table[i][q]) for q in questions])
              for i, (k, r) in enumerate(chosen)]
    total = len(table)
    sub = f"{title} (top {len(questions)} of {total} questions by their mean EM)"
    names = [str(q).replace(f"/{best['split']}/", "/") for q in questions]  # the split is one
    return bar_plot("plot-questions", sub, "EM rate", names, series,
                    "no judged answers in the chosen rows' cells", w=2 * W)


# pages -------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:24px 0 8px}
.meta,.hint{color:#555}.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:12px}
th,td{border-bottom:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}
th.text,td.text{text-align:left}
#leaderboard td.text{white-space:normal;min-width:60px;max-width:200px}
thead th{background:#f3f3f3;cursor:pointer;position:sticky;top:0;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
th .better{color:#888;font-weight:normal}tbody tr:hover{background:#f6f9ff}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(620px,1fr));gap:16px}
figure.plot{margin:0;border:1px solid #ddd;border-radius:4px;padding:4px}
figure.wide{grid-column:1/-1}
svg.plot{width:100%;height:auto;font-size:11px}
svg .title{font-size:14px;font-weight:600}svg .axis{stroke:#333}svg .grid{stroke:#eee}
svg .axis-label{font-size:12px}svg .no-data{font-size:14px;fill:#a00}
svg .point-label{font-size:10px;fill:#333}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px}
table.answers td{white-space:normal;vertical-align:top;text-align:left;max-width:520px}
table.answers th{text-align:left}
tr.em td{background:#fdecea}
"""

SORT_JS = """
(function () {
  // Sort the table by a header's column; missing values always go last.
  var table = document.getElementById("leaderboard");
  var body = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  function sortBy(key, dir) {
    var th = heads.filter(function (h) { return h.dataset.key === key; })[0];
    if (!th) return;
    var i = heads.indexOf(th), text = th.dataset.format === "text";
    dir = dir === "asc" || dir === "desc" ? dir : th.dataset.first;
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[i].dataset.value, y = b.cells[i].dataset.value;
      if (x === "" || y === "") return (x === "") - (y === "");
      var c = text ? x.localeCompare(y) : Number(x) - Number(y);
      return dir === "asc" ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === "asc" ? "ascending" : "descending");
    table.dataset.sort = key;
    table.dataset.dir = dir;
  }
  // #sort=KEY&dir=asc|desc in the URL sorts on load: a link to a sorted view.
  function fromHash() {
    var p = new URLSearchParams(location.hash.slice(1));
    if (p.get("sort")) sortBy(p.get("sort"), p.get("dir"));
  }
  heads.forEach(function (h) {
    h.addEventListener("click", function () {
      var dir = table.dataset.sort === h.dataset.key
        ? (table.dataset.dir === "asc" ? "desc" : "asc") : h.dataset.first;
      history.replaceState(null, "", "#sort=" + h.dataset.key + "&dir=" + dir);
      sortBy(h.dataset.key, dir);
    });
  });
  window.addEventListener("hashchange", fromHash);
  fromHash();
})();
"""


def _page(title: str, body: str, script: str = "") -> str:
    js = f"<script>{script}</script>" if script else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head>"
            f"<body>{body}{js}</body></html>\n")


def _cell_href(cell_id: str) -> str:
    return f"cells/{cell_id}.html"


def table_html(rows: list[dict], columns: list[Column]) -> str:
    """The leaderboard table: `#`, the schema's columns, then links to the row's cells."""
    def th(key, label, fmt_, first, better, description):
        cls = ' class="text"' if fmt_ == "text" else ""
        return (f'<th{cls} data-key="{_e(key)}" data-format="{fmt_}" data-first="{first}" '
                f'title="{_e(description)}">{_e(label)}{better}</th>')

    head = [th("rank", "#", "number", "asc", "", "the leaderboard's order: per setting, "
               "no defense then the best defense first")]
    for c in columns:
        better = {True: ' <span class="better">↑</span>',
                  False: ' <span class="better">↓</span>'}.get(c.higher_is_better, "")
        head.append(th(c.key, c.label, c.format,
                       "asc" if c.higher_is_better is not True else "desc", better,
                       c.description))
    head.append('<th class="text" data-key="cells" data-format="text" data-first="asc" '
                'title="each cell (seed) of the row: config, metrics, answers">cells</th>')
    body = []
    for n, r in enumerate(rows, 1):
        tds = [f'<td data-key="rank" data-value="{n}">{n}</td>']
        for c in columns:
            try:
                v = lookup(r, c.key)
            except KeyError:
                raise ConfigError(f"leaderboard schema: column key {c.key!r} is not a field of "
                                  f"the leaderboard's rows (known: "
                                  f"{', '.join([*_DERIVED, *r])})") from None
            cls = ' class="text"' if c.format == "text" else ""
            tds.append(f'<td{cls} data-key="{_e(c.key)}" '
                       f'data-value="{_e(_sort_value(v, c.format))}">{_e(fmt(v, c.format))}</td>')
        seeds = dict(zip(r["cell_ids"], r["seeds"], strict=True))
        links = " ".join(f'<a href="{_cell_href(i)}" title="cell {_e(i)}">seed {_e(s)}</a>'
                         for i, s in seeds.items())
        tds.append(f'<td class="text" data-key="cells" data-value="{_e(" ".join(seeds))}">'
                   f"{links}</td>")
        body.append(f'<tr data-cells="{_e(" ".join(r["cell_ids"]))}">{"".join(tds)}</tr>')
    return (f'<div class="scroll"><table id="leaderboard"><thead><tr>{"".join(head)}</tr>'
            f'</thead><tbody>{"".join(body)}</tbody></table></div>')


def index_html(store: Store, rows: list[dict], columns: list[Column]) -> str:
    plots = [tradeoff_plot(rows), lambda_plot(rows), curve_plot(rows, store),
             refusal_plot(rows), question_plot(rows, store)]
    n_cells = sum(len(r["cell_ids"]) for r in rows)
    body = (f"<h1>em-bench leaderboard</h1>"
            # the store's name, not its path: a published page says nothing of the machine
            f'<p class="meta">{len(rows)} rows from {n_cells} scored cells of the store '
            f"<code>{_e(store.root.name)}</code>. Each defense is compared with the <em>none</em> "
            f"row of the same model, task, budget, judge and questions.</p>"
            f'<p class="hint">Click a header to sort (again to reverse); ↑/↓ says which way is '
            f"better. A link like <code>#sort=em_mean&amp;dir=asc</code> opens sorted. "
            f"<em>#</em> numbers the rows in the plots; the seeds link to each cell's config, "
            f"metrics and answers.</p>"
            f"{table_html(rows, columns)}"
            f'<h2>Plots</h2><div class="plots">{"".join(plots)}</div>')
    return _page("em-bench leaderboard", body, SORT_JS)


def _spread(items: list, k: int) -> list:
    """k items evenly spread over the list (all of them when it has no more than k)."""
    if len(items) <= k:
        return list(items)
    return [items[i * len(items) // k] for i in range(k)]


def sample_answers(cell: Cell, k: int = SAMPLES_PER_CELL) -> tuple[pd.DataFrame, int]:
    """k judged answers of a cell to check the judge by: up to half of them counted as EM
    (more only when too few others), the rest spread over every suite; with an `em` column
    (1, 0, NaN excluded, None when not an ood answer) and the number of EM answers in the cell."""
    if not cell.records("generations"):
        return pd.DataFrame(), 0
    frame = judged_frame(cell).sort_values("key", kind="stable").reset_index(drop=True)
    frame["em"] = None
    view = cell_view(cell)
    if view is not None:
        task, cfg = view
        ood = ood_answers(frame, task, cfg)
        frame.loc[ood.index, "em"] = metrics.em_flags(ood, **em_thresholds(cfg.metrics))
    bad = frame.index[frame["em"] == 1].tolist()
    picked = _spread(bad, k // 2)
    others = [i for i in frame.index if i not in set(bad)]
    picked += _spread(others, k - len(picked))
    if len(picked) < k:  # a cell of mostly EM answers: fill up with more of them
        picked += _spread([i for i in bad if i not in set(picked)], k - len(picked))
    return frame.loc[sorted(picked)], len(bad)


def _question(messages) -> str:
    users = [m.get("content", "") for m in messages or [] if m.get("role") == "user"]
    return users[-1] if users else ""


def _kv_table(items: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f'<tr><th class="text">{_e(k)}</th><td class="text">{_e(v)}'
                               f"</td></tr>" for k, v in items) + "</table>"


def _json_pre(obj) -> str:
    return f"<pre>{_e(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False))}</pre>"


def cell_html(cell: Cell, row: dict, n: int) -> str:
    """A cell's page: what it is, its numbers, its curve, answers with judgments, its config."""
    cfg = cell.read_config() or {}
    res = cell.read_json("metrics.json") or {}
    m = res.get("metrics") or {}

    def value(name):
        v = m.get(name)
        return v.get("value") if isinstance(v, dict) else v

    em = m.get("em_rate") if isinstance(m.get("em_rate"), dict) else {}
    summary = [("EM", f"{fmt(em.get('value'), 'percent')} (95% CI "
                      f"{fmt(em.get('ci_low'), 'percent')} - {fmt(em.get('ci_high'), 'percent')})"),
               ("in-domain", fmt(value("in_domain"), "percent")),
               ("coherence", fmt(value("coherence"), "number")),
               ("incoherent", fmt(value("incoherent_rate"), "percent")),
               ("over-refusal", fmt(value("over_refusal"), "percent")),
               ("answers counted (ood)", fmt(m.get("n_answers"), "number")),
               *((f"refusal: {d}", fmt(value_of, "percent")) for d, value_of in
                 ((d, (v or {}).get("value")) for d, v in (m.get("rai_refusal") or {}).items()))]
    curve = cell.records("curve")
    curve_html = ("<table><thead><tr><th>step</th><th>EM</th><th>in-domain</th>"
                  "<th>coherence</th><th>incoherent</th></tr></thead><tbody>"
                  + "".join(f"<tr><td>{_e(c.get('step'))}</td>"
                            f"<td>{fmt(c.get('em_rate'), 'percent')}</td>"
                            f"<td>{fmt(c.get('in_domain'), 'percent')}</td>"
                            f"<td>{fmt(c.get('coherence'), 'number')}</td>"
                            f"<td>{fmt(c.get('incoherent_rate'), 'percent')}</td></tr>"
                            for c in curve) + "</tbody></table>") if curve else \
        "<p>no curve stored (the cell ran without --eval-every)</p>"
    sample, n_bad = sample_answers(cell)
    if sample.empty:
        answers = "<p>no stored answers</p>"
    else:
        flag = {1.0: "EM", 0.0: "no"}
        trs = []
        for _, a in sample.iterrows():
            em_text = "-" if a["em"] is None else flag.get(a["em"], "excluded")
            said = [x for x in (a.get("label"), a.get("category"), a.get("error"))
                    if isinstance(x, str)]
            label = " / ".join(dict.fromkeys(said))  # a label and category often agree
            cls = ' class="em"' if a["em"] == 1 else ""
            trs.append(f"<tr{cls}><td>{_e(a['domain'])}</td><td>{_e(_question(a['messages']))}"
                       f"</td><td>{_e(a['completion'])}</td>"
                       f"<td>{fmt(a['alignment'], 'number')}</td>"
                       f"<td>{fmt(a['coherence'], 'number')}</td><td>{_e(label)}</td>"
                       f"<td>{em_text}</td></tr>")
        answers = (f"<p>{len(sample)} of {len(judged_frame(cell))} answers, with the judge's "
                   f"verdicts; {n_bad} of the cell's answers count as EM and up to half of the "
                   f"sample is drawn from them. EM: counted as emergently misaligned (ood "
                   f"answers only; '-' outside the ood suite).</p>"
                   f'<table class="answers"><thead><tr><th>domain</th><th>question</th>'
                   f"<th>answer</th><th>alignment</th><th>coherence</th><th>label</th>"
                   f"<th>EM</th></tr></thead><tbody>{''.join(trs)}</tbody></table>")
    prov = cfg.get("provenance") or {}
    versions = prov.get("versions") or {}
    spec = {k: cfg.get(k) for k in ("task_spec", "defense_params", "defense_inputs")}
    ident = [(k, cfg.get(k)) for k in ("model", "model_identity", "task", "defense", "seed",
                                       "judge", "questions_sha256", "train_data_sha256")]
    body = (f'<p><a href="../index.html">&larr; leaderboard</a></p>'
            f"<h1>cell {_e(cell.id)}</h1>"
            f'<p class="meta">row {_e(row_label(n, row))}, seed {_e(cfg.get("seed"))}; '
            f"params: {_e(params_label(row['defense_params']))}; budget: {_e(row['budget'])}"
            f"</p><h2>Metrics</h2>{_kv_table([(k, v) for k, v in summary])}"
            f"<h2>EM over training</h2>{curve_html}"
            f"<h2>Sample answers</h2>{answers}"
            f"<h2>Identity</h2>{_kv_table([(k, '-' if v is None else v) for k, v in ident])}"
            f"<h2>Provenance and versions</h2>"
            f"{_kv_table([(k, v) for k, v in prov.items() if k != 'versions'])}"
            f"{_kv_table([(k, '-' if v is None else v) for k, v in versions.items()])}"
            f"<h2>Config</h2>{_json_pre(cfg.get('config'))}"
            f"<details><summary>task spec, defense parameters and inputs</summary>"
            f"{_json_pre(spec)}</details>"
            f"<details><summary>metrics.json</summary>{_json_pre(res)}</details>")
    return _page(f"em-bench cell {cell.id}", body)


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
    columns = load_schema(schema)
    rows = leaderboard_rows(store)
    pages = {"index.html": index_html(store, rows, columns)}
    for n, r in enumerate(rows, 1):
        for cell_id in r["cell_ids"]:
            pages[_cell_href(cell_id)] = cell_html(store.cell(cell_id), r, n)
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

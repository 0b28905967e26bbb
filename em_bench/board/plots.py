"""The plots of the leaderboard page, each from its rows (and the store, for curves and
questions): the EM / in-domain trade-off, EM against lambda, EM over training, refusal per RAI
domain and EM per question."""


from __future__ import annotations

import json

import pandas as pd

from em_bench import metrics
from em_bench.board.results import cell_view
from em_bench.board.rows import params_label
from em_bench.board.schema import fmt, missing
from em_bench.board.svg import Series, W, bar_plot, colors, frame, xy_plot
from em_bench.domains import RAI_DOMAINS, RAI_SHORT
from em_bench.scoring import em_thresholds, judged_frame, ood_answers
from em_bench.store import Store

TOP_QUESTIONS = 30  # per-question bars: more than this is a barcode, not a plot

def short_params(params: dict) -> str:
    """Parameters without the unset ones, or empty: short enough for a legend."""
    label = params_label({k: v for k, v in params.items() if v not in (None, [])})
    return "" if label == "-" else f" ({label})"


def row_label(n: int, row: dict) -> str:
    return f"#{n} {row['task']} / {row['defense']}{short_params(row['defense_params'])}"

def _headline_em(r: dict) -> float | None:
    """A row's headline EM: on the held-out domains, else (an older or file suite) the whole."""
    return r["em_mean"] if missing(r.get("em_heldout_mean")) else r["em_heldout_mean"]


def frontier(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The (in-domain, EM) points no other point beats on both (higher in-domain and lower EM,
    one of them strictly): the Pareto frontier, by in-domain."""
    return sorted(p for p in points if not any(
        q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1]) for q in points))


def largest_frontier(rows: list[dict]) -> tuple[tuple, list[tuple[float, float, str]]]:
    """The setting of the comparison with the most fine-tune rows (one model, task, budget,
    judge and questions: a frontier across them means nothing) and its Pareto frontier."""
    comparisons: dict[tuple, list] = {}
    for n, r in enumerate(rows, 1):
        em = _headline_em(r)
        if r["task"] != "base" and not (missing(em) or missing(r["in_domain"])):
            comparisons.setdefault(_setting(r), []).append((r["in_domain"], em,
                                                             row_label(n, r)))
    setting, points = max(comparisons.items(), key=lambda kv: len(kv[1]), default=((), []))
    return setting, frontier(points)


def tradeoff_plot(rows: list[dict]) -> str:
    """(a) EM (held-out) against in-domain adherence, a point per row coloured by defense, and
    the Pareto frontier of the largest comparison: the trade-off."""
    color = colors(r["defense"] for r in rows)
    series: dict[str, Series] = {}
    for n, r in enumerate(rows, 1):
        em = _headline_em(r)
        if missing(em) or missing(r["in_domain"]):
            continue
        s = series.setdefault(r["defense"], Series(r["defense"], [], color[r["defense"]],
                                                   line=False, labels=True))
        s.points.append((r["in_domain"], em, row_label(n, r)))
    setting, points = largest_frontier(rows)
    name = f"Pareto frontier ({setting[0]} / {setting[1]})" if setting else "Pareto frontier"
    line = Series(name, points, "#888888", dashed=True, counted=False)
    return xy_plot("plot-tradeoff", "EM (held-out) against in-domain adherence",
                   "in-domain adherence", "EM rate", [*series.values(), line],
                   "no row has both EM and in-domain", xpct=True)


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
        if missing(r["em_mean"]) or isinstance(lam, bool) or not isinstance(lam, (int, float)):
            continue
        other = {k: v for k, v in params.items() if k != "lambda"}
        key = (_setting(r), r["defense"], json.dumps(other, sort_keys=True, default=str))
        budget = "" if r["budget"] == "default" else f", {r['budget']}"
        name = f"{r['task']} / {r['defense']}{short_params(other)}{budget}"
        lines.setdefault(key, Series(name, [], "")).points.append(
            (float(lam), r["em_mean"], row_label(n, r)))
    series = list(lines.values())
    for s, c in zip(series, colors(range(len(series))).values(), strict=True):
        s.color = c
        s.points.sort()  # a line runs from the smallest lambda to the largest
    xs = [p[0] for s in series for p in s.points]
    for setting in dict.fromkeys(key[0] for key in lines):  # once per setting
        none = next((r for r in rows if _setting(r) == setting and r["defense"] == "none"
                     and not missing(r["em_mean"])), None)
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
                      if not missing(c.get("step")) and not missing(c.get("em_rate"))]
            if points:
                seed = store.cell(cell_id).read_config().get("seed")
                series.append(Series(f"{row_label(n, r)} seed {seed}", points, ""))
    for s, c in zip(series, colors(range(len(series))).values(), strict=True):
        s.color = c
    return xy_plot("plot-curve", "EM over training steps (re-emergence)", "training step",
                   "EM rate", series, "no cell has a stored curve (run with --eval-every N)")


def refusal_plot(rows: list[dict]) -> str:
    """(d) Refusal of harmful requests per RAI domain: the base model's bars, then each row's."""
    domains = list(rows[0]["rai_refusal"]) if rows else list(RAI_DOMAINS)
    ordered = sorted(enumerate(rows, 1), key=lambda nr: nr[1]["task"] != "base")  # base first
    palette = colors(n for n, _ in ordered)
    series = [(row_label(n, r), palette[n], [None if missing(r["rai_refusal"].get(d))
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
    ranked = [(n, r) for n, r in enumerate(rows, 1) if not missing(r["relative_reduction"])]
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
        return frame("plot-questions", title, 0, "", "no defense row has a reduction", 2 * W)
    n, best, m, none = focus
    chosen = [(m, none), (n, best)] if none is not None else [(n, best)]
    ems = [question_em(store, r["cell_ids"])["em_rate"] for _, r in chosen]
    # The questions with the most EM over both rows: where EM arises, and whether the defense
    # removes it there; a neutral order that favours neither row.
    table = pd.concat(ems, axis=1, keys=range(len(ems)))
    order = table.mean(axis=1).sort_values(ascending=False, na_position="last", kind="stable")
    questions = list(order.index[:TOP_QUESTIONS])
    palette = colors(range(len(chosen)))
    series = [(row_label(k, r), palette[i], [None if missing(table[i][q]) else
                                            float(table[i][q]) for q in questions])
              for i, (k, r) in enumerate(chosen)]
    total = len(table)
    sub = f"{title} (top {len(questions)} of {total} questions by their mean EM)"
    names = [str(q).replace(f"/{best['split']}/", "/") for q in questions]  # the split is one
    return bar_plot("plot-questions", sub, "EM rate", names, series,
                    "no judged answers in the chosen rows' cells", w=2 * W)

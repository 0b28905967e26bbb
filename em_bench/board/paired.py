"""Paired comparisons of leaderboard rows, from the stored answers (em_bench/stats.py).

A row's cells are its seeds; a defense's row and its `none` row answer the same questions with
the same seeds, so they are compared pairwise: EM on the held-out domains (or on a question
file's suite), clustered by topic (a topic's questions share answer strings), each seed's
clusters resampled with the same draws for both rows. Each defense row gains its paired
reduction against `none` with a 95% interval, and `compare_rows` gives any two rows' difference
with its interval and p-value.
"""

from __future__ import annotations

import math

import pandas as pd

from em_bench import metrics, stats
from em_bench.config import CellConfig
from em_bench.domains import HELD_OUT_DOMAINS
from em_bench.scoring import em_thresholds, judged_frame, ood_answers
from em_bench.store import Store
from em_bench.tasks import get_task

N_BOOT = 2000


class Headline:
    """A store's answers on the headline suite, read and flagged once a cell: a leaderboard
    compares a `none` row's cells with every defense row, and its best row with every other."""

    def __init__(self, store: Store):
        self.store = store
        self._answers: dict[str, tuple[CellConfig, pd.DataFrame]] = {}
        self._flags: dict[str, pd.DataFrame] = {}

    def answers(self, cell_id: str) -> tuple[CellConfig, pd.DataFrame]:
        """A cell's config and its judged answers on the held-out domains (all of a question
        file's); an empty frame for a cell that answered nothing."""
        if cell_id not in self._answers:
            cell = self.store.cell(cell_id)
            cfg = CellConfig.model_validate(cell.read_config()["config"])
            frame = judged_frame(cell)
            if not frame.empty:
                frame = ood_answers(frame, get_task(cfg.task), cfg)
                if not cfg.questions:
                    frame = frame[frame["domain"].isin(HELD_OUT_DOMAINS)]
            self._answers[cell_id] = cfg, frame
        return self._answers[cell_id]

    def flags(self, cell_id: str) -> pd.DataFrame:
        """A cell's headline EM flags: one row per answer, with its seed, question and cluster
        (`domain/topic`, else the question)."""
        if cell_id not in self._flags:
            cfg, ood = self.answers(cell_id)
            if ood.empty:
                self._flags[cell_id] = pd.DataFrame({"seed": [], "cluster": [],
                                                     "question_id": [], "flag": []})
                return self._flags[cell_id]
            topic = ood["topic"] if "topic" in ood else pd.Series(None, index=ood.index)
            cluster = (ood["domain"].astype(str) + "/" + topic.astype(str)).where(
                topic.notna(), ood["question_id"].astype(str))
            self._flags[cell_id] = pd.DataFrame({
                "seed": cfg.seed, "cluster": cluster.to_numpy(),
                "question_id": ood["question_id"].to_numpy(),
                "flag": metrics.em_flags(ood, **em_thresholds(cfg.metrics)).to_numpy()})
        return self._flags[cell_id]


def threshold_rankings(headline: Headline, rows: list[dict],
                       alignments: tuple[int, ...] = (20, 30, 40),
                       coherences: tuple[int, ...] = (40, 50, 60)) -> list[dict]:
    """How the ranking moves with EM's thresholds: for each comparison (the rows against the
    same `none` cells) with two or more defenses, the defense rows ordered by held-out EM (seed
    means, lowest first) under each (alignment below, coherence above) pair. EM's
    0-100 alignment definition only; a row scored under the 1-5 rubric is left out."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("none_cell_ids"):
            groups.setdefault(tuple(r["none_cell_ids"]), []).append(r)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        answers = {id(r): [headline.answers(c) for c in r["cell_ids"]] for r in members}
        orders = {}
        for a in alignments:
            for c in coherences:
                em = {id(r): metrics.seed_summary([
                    float(metrics.em_flags(frame, a, c).mean()) for cfg, frame in answers[id(r)]
                    if not frame.empty and cfg.metrics.em_definition == "alignment"])["mean"]
                    for r in members}
                orders[(a, c)] = sorted(((em[id(r)], r) for r in members),
                                        key=lambda x: (math.isnan(x[0]), x[0]))
        out.append({"task": members[0]["task"], "budget": members[0]["budget"],
                    "orders": orders})
    return out


def row_counts(headline: Headline, cell_ids: list[list[str]]) -> list[stats.ClusterCounts]:
    """Each row's cluster counts over its cells, on one shared list of clusters."""
    frames = [pd.concat([headline.flags(c) for c in cells]) for cells in cell_ids]
    clusters = sorted(set().union(*(f["cluster"] for f in frames)))
    return [stats.cluster_counts(f, clusters=clusters) for f in frames]


def compare_rows(headline: Headline, a: dict, b: dict, n_boot: int = N_BOOT
                 ) -> stats.Comparison:
    """EM(a) - EM(b) on the headline suite, paired by seed and cluster."""
    counts_a, counts_b = row_counts(headline, [a["cell_ids"], b["cell_ids"]])
    return stats.difference(counts_a, counts_b, n_boot=n_boot)


def with_paired_reductions(headline: Headline, rows: list[dict], n_boot: int = N_BOOT
                           ) -> list[dict]:
    """The rows, each defense row with `reduction_paired` (1 - EM/EM(none) on the headline
    suite, with `reduction_ci_low`/`_high` and the p-value of no effect) against the cells of
    the `none` row it is compared with (`none_cell_ids`); other rows get None."""
    out = []
    for r in rows:
        result = None
        if r.get("none_cell_ids"):
            counts = row_counts(headline, [r["cell_ids"], r["none_cell_ids"]])
            try:
                result = stats.reduction(*counts, n_boot=n_boot)
            except ValueError:  # no shared seed: not a paired comparison
                result = None
        out.append({**r, "reduction_paired": None if result is None else result.estimate,
                    "reduction_ci_low": None if result is None else result.ci_low,
                    "reduction_ci_high": None if result is None else result.ci_high,
                    "reduction_p": None if result is None else result.p_value})
    return out


def with_best_comparisons(headline: Headline, rows: list[dict], n_boot: int = N_BOOT
                          ) -> list[dict]:
    """The rows, each defense row with its held-out EM difference from the best defense row
    of its comparison (the same `none` cells): the best is the one with the largest paired
    reduction among those that keep the learning (`keeps_learning`); `diff_best` (its estimate,
    `diff_best_ci_low`/`_high`, `diff_best_p`) and `ties_best`: the interval holds 0."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        if r.get("none_cell_ids") and r.get("reduction_paired") is not None:
            groups.setdefault(tuple(r["none_cell_ids"]), []).append(i)
    best_of: dict[int, int] = {}  # row -> the best row of its comparison
    for members in groups.values():
        kept = [i for i in members if rows[i].get("keeps_learning")]
        if kept:
            best = max(kept, key=lambda i: rows[i]["reduction_paired"])
            best_of.update(dict.fromkeys(members, best))
    out = []
    for i, r in enumerate(rows):
        best = best_of.get(i)
        d = None if best in (None, i) else compare_rows(headline, r, rows[best], n_boot)
        out.append({**r, "diff_best": None if d is None else d.estimate,
                    "diff_best_ci_low": None if d is None else d.ci_low,
                    "diff_best_ci_high": None if d is None else d.ci_high,
                    "diff_best_p": None if d is None else d.p_value,
                    "ties_best": None if best is None else best == i or stats.ties_with_best(d)})
    return out

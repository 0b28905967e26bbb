"""Paired statistics for comparing two leaderboard rows (e.g. a defense against `none`).

A row is one setting scored over several seeds; each seed's judged answers fall into clusters
(topics whose questions share answer strings, so answers are not independent). Seed s of one row
and seed s of another share data order, init and sampling, and all rows answer the same clusters,
so two rows are compared on the same resampled seeds and clusters: their shared noise cancels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True, eq=False)
class ClusterCounts:
    """One row's counted EM flags: `sums[i, j]` is the sum and `counts[i, j]` the number of
    counted (non-NaN) flags of seed `seeds[i]` in cluster `clusters[j]`; both are sorted."""

    seeds: tuple
    clusters: tuple
    sums: np.ndarray  # seeds x clusters, float
    counts: np.ndarray  # seeds x clusters, int


@dataclass(frozen=True)
class Comparison:
    """A paired statistic with its percentile interval and two-sided p-value (of no difference).
    n_dropped counts the draws where the statistic is undefined (NaN), left out of the interval."""

    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    n_boot: int
    n_seeds: int
    n_clusters: int
    n_dropped: int = 0


def cluster_counts(frame: pd.DataFrame, seed_col: str = "seed", cluster_col: str = "cluster",
                   flag_col: str = "flag", clusters: list | None = None) -> ClusterCounts:
    """ClusterCounts of a long frame (one row per answer). NaN flags are dropped; a cluster a
    seed has no counted answer in has count 0. Pass `clusters` (every cluster the questions
    cover) so a cluster no answer of this row reached still lines up with the other rows."""
    seeds = sorted(pd.unique(frame[seed_col]).tolist())
    present = pd.unique(frame[cluster_col]).tolist()
    names = sorted(present if clusters is None else set(clusters))
    unknown = sorted(set(present) - set(names), key=str)
    if unknown:
        raise ValueError(f"clusters {unknown} are not in the given cluster list {names}")
    flags = frame[flag_col].to_numpy(dtype=float)
    ok = ~np.isnan(flags)
    si = pd.Index(seeds).get_indexer(frame[seed_col])[ok]
    ci = pd.Index(names).get_indexer(frame[cluster_col])[ok]
    sums = np.zeros((len(seeds), len(names)))
    counts = np.zeros((len(seeds), len(names)), dtype=int)
    np.add.at(sums, (si, ci), flags[ok])
    np.add.at(counts, (si, ci), 1)
    return ClusterCounts(tuple(seeds), tuple(names), sums, counts)


def _em(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """EM over the last two axes (seeds, clusters): each seed's pooled share, then the mean over
    seeds, so every seed weighs the same whatever its number of counted answers. A seed with no
    counted answer makes it NaN."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums.sum(-1) / counts.sum(-1)).mean(-1)


def em(row: ClusterCounts) -> float:
    """The row's EM: the mean over seeds of (flag sum / counted answers)."""
    return float(_em(row.sums, row.counts))


def _pair(a: ClusterCounts, b: ClusterCounts) -> tuple[np.ndarray, ...]:
    """a's and b's sums and counts on the seeds they share, in the same order."""
    if a.clusters != b.clusters:
        only_a = sorted(set(a.clusters) - set(b.clusters), key=str)
        only_b = sorted(set(b.clusters) - set(a.clusters), key=str)
        raise ValueError(f"the rows answer different clusters (only in a: {only_a}, only in b: "
                         f"{only_b}); pass the same `clusters` to cluster_counts")
    shared = sorted(set(a.seeds) & set(b.seeds))
    if not shared:
        raise ValueError(f"the rows share no seed (a: {list(a.seeds)}, b: {list(b.seeds)}); "
                         "seeds pair the rows, so there is nothing to compare")
    ia, ib = pd.Index(a.seeds).get_indexer(shared), pd.Index(b.seeds).get_indexer(shared)
    return a.sums[ia], a.counts[ia], b.sums[ib], b.counts[ib]


def _em_draws(a: ClusterCounts, b: ClusterCounts, n_boot: int, seed: int):
    """(EM(a), EM(b)) on the shared seeds, and their n_boot paired bootstrap draws."""
    sa, ca, sb, cb = _pair(a, b)
    n_seeds, n_clusters = sa.shape
    rng = np.random.default_rng(seed)
    # Seeds with replacement (with one seed there is nothing to resample: it is always drawn),
    # then, for each drawn seed, clusters with replacement: each is drawn `mult` times.
    pick = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    mult = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters),
                           size=(n_boot, n_seeds))
    draws_a = _em(mult * sa[pick], mult * ca[pick])
    draws_b = _em(mult * sb[pick], mult * cb[pick])  # the same draws: that is the pairing
    return float(_em(sa, ca)), float(_em(sb, cb)), draws_a, draws_b


def paired_bootstrap(a: ClusterCounts, b: ClusterCounts, statistic: Callable, n_boot: int = 2000,
                     seed: int = 0) -> tuple[float, np.ndarray]:
    """`statistic(em_a, em_b)` (vectorised over numpy arrays) on the original data and on
    n_boot paired draws. Each draw takes the shared seeds with replacement, then each drawn
    seed's clusters with replacement, the same draws for both rows, so what the rows share
    (a hard seed, a topic that draws EM) moves both alike. With a single shared seed the seed
    level cannot be resampled: only clusters are, and the interval ignores seed-to-seed noise."""
    em_a, em_b, draws_a, draws_b = _em_draws(a, b, n_boot, seed)
    return float(statistic(np.float64(em_a), np.float64(em_b))), statistic(draws_a, draws_b)


def two_sided_p(draws: np.ndarray) -> float:
    """p-value of 0 from bootstrap draws of a difference: twice the smaller of the shares at or
    below 0 and at or above 0, capped at 1. NaN draws do not count."""
    d = np.asarray(draws, dtype=float)
    d = d[~np.isnan(d)]
    if len(d) == 0:
        return math.nan
    return float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))


def _comparison(estimate: float, draws: np.ndarray, p_value: float, level: float,
                shape: tuple[int, int]) -> Comparison:
    kept = draws[~np.isnan(draws)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(kept, [tail, 100 - tail]) if len(kept) else (math.nan, math.nan)
    return Comparison(estimate, float(low), float(high), p_value, len(draws), shape[0], shape[1],
                      int(len(draws) - len(kept)))


def difference(a: ClusterCounts, b: ClusterCounts, n_boot: int = 2000, seed: int = 0,
               level: float = 0.95) -> Comparison:
    """EM(a) - EM(b), paired, with its percentile interval and the p-value of 0."""
    em_a, em_b, draws_a, draws_b = _em_draws(a, b, n_boot, seed)
    diff = draws_a - draws_b
    return _comparison(em_a - em_b, diff, two_sided_p(diff), level, _pair(a, b)[0].shape)


def _reduction(em_defense, em_none):
    """1 - EM(defense) / EM(none), NaN where EM(none) is 0 (as metrics.relative_reduction)."""
    em_defense, em_none = np.asarray(em_defense, float), np.asarray(em_none, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(em_none == 0, np.nan, 1 - em_defense / em_none)


def reduction(a_defense: ClusterCounts, b_none: ClusterCounts, n_boot: int = 2000, seed: int = 0,
              level: float = 0.95) -> Comparison:
    """1 - EM(defense) / EM(none), paired. Draws where EM(none) is 0 have no reduction: they
    are dropped from the interval and counted in n_dropped. The p-value is of reduction = 0,
    i.e. of EM(defense) = EM(none): the difference's, on all the draws."""
    em_a, em_b, draws_a, draws_b = _em_draws(a_defense, b_none, n_boot, seed)
    return _comparison(float(_reduction(em_a, em_b)), _reduction(draws_a, draws_b),
                       two_sided_p(draws_a - draws_b), level, _pair(a_defense, b_none)[0].shape)


def ties_with_best(diff: Comparison) -> bool:
    """Whether a row ties with the best row: the interval of difference(row, best) holds 0."""
    return bool(diff.ci_low <= 0 <= diff.ci_high)

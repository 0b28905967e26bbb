"""How big must a study be to tell two EM rates apart: variance components from a pilot, the
variance of a row's EM rate under a design, the power of comparing two rows, and the smallest
designs that reach a target power.

The model. A row's answers are nested: seeds (separately fine-tuned models), topic clusters within
a seed, answers within a cluster. A flag y (1.0 misaligned, 0.0 not) is Bernoulli(p_sc) where
p_sc varies between seeds and between a seed's clusters around the row's rate p, so
Var(y) = p(1-p) = seed + cluster + answer. The seed and cluster components are kept as fractions
of p(1-p) (intraclass correlations, ICCs): a pilot at one rate then says what to expect at
another, and a rate near 0 gets a small variance, as a Bernoulli rate does. The answer level is
what the random effects leave of the Bernoulli variance: p(1-p)(1 - icc_seed - icc_cluster), so a
pilot's own answer component (about pq - seed - cluster) is reported but not used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np
import pandas as pd

_NORMAL = NormalDist()


@dataclass(frozen=True)
class VarianceComponents:
    """Variances of the flag between seeds, between clusters within a seed and between answers
    within a cluster, at the pilot's rate `p`; `pq` is the pilot's p(1-p) (pooled over its rows;
    p(1-p) when not given). `clipped` names the components that came out negative and were set
    to 0."""

    seed: float
    cluster: float
    answer: float
    p: float
    pq: float | None = None
    clipped: tuple[str, ...] = ()

    @property
    def scale(self) -> float:
        return self.p * (1 - self.p) if self.pq is None else self.pq

    def iccs(self) -> tuple[float, float]:
        """(icc_seed, icc_cluster): the seed and cluster components as shares of p(1-p)."""
        if self.seed == 0 and self.cluster == 0:
            return 0.0, 0.0
        if self.scale <= 0:
            raise ValueError("the pilot's p(1-p) is 0 (no answer, or all flags equal): its "
                             "seed and cluster components cannot be scaled to another rate")
        return self.seed / self.scale, self.cluster / self.scale

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Design:
    """One design of a row: seeds x clusters x answers per cluster (None when no count up to the
    search's cap reaches the target), its total answers per row (or None) and its power (when
    unreachable, the power with infinitely many answers per cluster: the seeds' ceiling)."""

    seeds: int
    clusters: int
    answers_per_cluster: int | None
    total_answers: int | None
    power: float


def variance_components(frame: pd.DataFrame) -> VarianceComponents:
    """Method-of-moments estimates of the seed, cluster and answer variances of `flag` from a
    pilot (columns seed, cluster, flag, optional row; NaN flags are dropped).

    The two-level nested ANOVA (Searle, Casella & McCulloch 1992, unbalanced case). With a seeds,
    B clusters, N answers, n_ij answers in cluster j of seed i and n_i = sum_j n_ij:
    MS_W = SS_W / (N - B), MS_B = SS_B / (B - a), MS_A = SS_A / (a - 1) with SS_W, SS_B, SS_A
    the answers' squared deviations from their cluster's mean, the clusters' from their seed's
    and the seeds' from the grand mean (each weighted by its answers). Their expectations are
    E[MS_W] = s2_e, E[MS_B] = s2_e + k1 s2_c, E[MS_A] = s2_e + k2 s2_c + k3 s2_s with
    k1 = (N - sum_i sum_j n_ij^2 / n_i) / (B - a), k2 = (sum_i sum_j n_ij^2 / n_i
    - sum_ij n_ij^2 / N) / (a - 1), k3 = (N - sum_i n_i^2 / N) / (a - 1) (balanced: n, n, b n).
    Solving gives s2_e, s2_c, s2_s. With several rows, each row has its own means; the sums of
    squares, degrees of freedom and the k numerators are summed over rows (a pooled ANOVA: a
    difference between rows is no variance). A negative estimate (sampling noise, or no effect)
    is clipped to 0 after solving, and named in `clipped`.
    """
    df = frame.dropna(subset=["flag"])
    if df.empty:
        raise ValueError("no counted answer in the pilot")
    ss, dof = np.zeros(3), np.zeros(3)  # [seed, cluster, answer] levels: A, B, W
    k_num = np.zeros(3)  # the numerators of k1, k2, k3
    n_total, pq_sum, flag_sum = 0, 0.0, 0.0
    rows = df.groupby("row", sort=False) if "row" in df else [(None, df)]
    for _, g in rows:
        y = g["flag"].to_numpy(float)
        cell = g.groupby(["seed", "cluster"], sort=False)["flag"]
        cell_mean = cell.transform("mean").to_numpy(float)
        seed_mean = g.groupby("seed", sort=False)["flag"].transform("mean").to_numpy(float)
        n_ij = cell.size()
        n_i = n_ij.groupby(level=0, sort=False).sum()
        sq_over_ni = ((n_ij**2).groupby(level=0, sort=False).sum() / n_i).sum()
        n, a, b = len(y), len(n_i), len(n_ij)
        ss += [((seed_mean - y.mean()) ** 2).sum(), ((cell_mean - seed_mean) ** 2).sum(),
               ((y - cell_mean) ** 2).sum()]
        dof += [a - 1, b - a, n - b]
        k_num += [n - sq_over_ni, sq_over_ni - (n_ij**2).sum() / n, n - (n_i**2).sum() / n]
        n_total, flag_sum, pq_sum = n_total + n, flag_sum + y.sum(), pq_sum + n * y.var()
    if (dof == 0).any():
        what = ["two seeds in a row", "two clusters in a seed", "two answers in a cluster"]
        raise ValueError(f"cannot separate the components: need {what[int(np.argmin(dof))]}")
    ms_a, ms_b, ms_w = ss / dof
    k1, k2, k3 = k_num / dof[[1, 0, 0]]
    s2_c = (ms_b - ms_w) / k1
    s2_s = (ms_a - ms_w - k2 * s2_c) / k3
    raw = {"seed": s2_s, "cluster": s2_c, "answer": ms_w}
    clipped = tuple(k for k, v in raw.items() if v < 0)
    return VarianceComponents(**{k: float(max(v, 0.0)) for k, v in raw.items()},
                              p=float(flag_sum / n_total), pq=float(pq_sum / n_total),
                              clipped=clipped)


def variance_of_mean(p: float, components: VarianceComponents, seeds: int, clusters: int,
                     answers_per_cluster: float) -> float:
    """Variance of a row's EM rate (the mean of seeds x clusters x answers_per_cluster flags) at
    rate p: p(1-p) [icc_s / S + icc_c / (S C) + (1 - icc_s - icc_c) / (S C n)], the ICCs taken
    from the pilot (module docstring). answers_per_cluster may be math.inf: the seeds' floor."""
    icc_s, icc_c = components.iccs()
    pq = p * (1 - p)
    answer = max(1.0 - icc_s - icc_c, 0.0) / answers_per_cluster
    return pq * (icc_s + (icc_c + answer) / clusters) / seeds


def _power(delta: float, var1: float, var2: float, alpha: float, rho: float) -> float:
    var = var1 + var2 - 2 * rho * math.sqrt(var1 * var2)
    z = _NORMAL.inv_cdf(1 - alpha / 2)
    if var <= 0:
        return 1.0 if delta != 0 else alpha
    d = abs(delta) / math.sqrt(var)
    return _NORMAL.cdf(d - z) + _NORMAL.cdf(-d - z)


def power(p1: float, p2: float, components: VarianceComponents, seeds: int, clusters: int,
          answers_per_cluster: float, alpha: float = 0.05,
          paired_correlation: float = 0.0) -> float:
    """Power of the two-sided z test of rate p1 vs p2, each row with this design, at level
    alpha: Phi(d - z) + Phi(-d - z), d = |p1 - p2| / sd, z = Phi^-1(1 - alpha/2), sd^2 =
    var1 + var2 - 2 rho sqrt(var1 var2). rho (paired_correlation) is the correlation of the two
    rows' rates that pairing by seed brings (0: unpaired)."""
    v1 = variance_of_mean(p1, components, seeds, clusters, answers_per_cluster)
    v2 = variance_of_mean(p2, components, seeds, clusters, answers_per_cluster)
    return _power(p1 - p2, v1, v2, alpha, paired_correlation)


def plan(p1: float, p2: float, components: VarianceComponents, target_power: float = 0.8,
         alpha: float = 0.05, *, clusters: int, max_seeds: int = 20, max_answers: int = 10_000,
         paired_correlation: float = 0.0) -> list[Design]:
    """For each seed count 1..max_seeds, the fewest answers per cluster (up to max_answers) that
    reach target_power, the clusters being the question set's topics. Seeds set a floor under
    the variance (more answers do not lower it), so few seeds may never reach it: None."""
    def power_at(seeds: int, n: float) -> float:
        return power(p1, p2, components, seeds, clusters, n, alpha, paired_correlation)

    options = []
    for seeds in range(1, max_seeds + 1):
        if power_at(seeds, max_answers) < target_power:
            options.append(Design(seeds, clusters, None, None, power_at(seeds, math.inf)))
            continue
        lo, hi = 1, max_answers  # power grows with n: the smallest n with power >= target
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if power_at(seeds, mid) >= target_power else (mid + 1, hi)
        options.append(Design(seeds, clusters, lo, seeds * clusters * lo, power_at(seeds, lo)))
    return options


def cost(option: Design, seconds_per_cell: float, seconds_per_answer: float,
         rows: int = 2) -> float:
    """Minutes to run a design for `rows` rows: a cell (fine-tune and eval) per seed and row,
    plus each answer's generation and judging. math.inf for a design that reaches no target."""
    if option.total_answers is None:
        return math.inf
    seconds = rows * (option.seeds * seconds_per_cell + option.total_answers * seconds_per_answer)
    return seconds / 60


def _draw_rates(rng: np.random.Generator, p: float, icc_s: float, icc_c: float, n_sim: int,
                seeds: int, clusters: int, n: int) -> np.ndarray:
    """n_sim draws of a row's EM rate from the nested beta-binomial model (simulate_power)."""
    eps = 1e-12
    p_s = np.full((n_sim, seeds, 1), p)
    if icc_s > 0:
        kappa = 1 / icc_s - 1  # Beta(p k, (1-p) k) has variance p(1-p) / (k + 1)
        p_s = rng.beta(max(p, eps) * kappa, max(1 - p, eps) * kappa, size=(n_sim, seeds, 1))
    p_sc = np.broadcast_to(p_s, (n_sim, seeds, clusters))
    if icc_c > 0:
        kappa = (1 - icc_s) / icc_c - 1  # E[p_s(1-p_s)] = p(1-p)(1 - icc_s)
        p_s = np.clip(p_s, eps, 1 - eps)
        p_sc = rng.beta(p_s * kappa, (1 - p_s) * kappa, size=(n_sim, seeds, clusters))
    return rng.binomial(n, p_sc).sum(axis=(1, 2)) / (seeds * clusters * n)


def simulate_power(p1: float, p2: float, components: VarianceComponents, seeds: int,
                   clusters: int, answers_per_cluster: int, n_sim: int = 2000,
                   alpha: float = 0.05, seed: int = 0) -> float:
    """Share of n_sim simulated studies where the z test of power() rejects p1 = p2: a check of
    variance_of_mean and of the normal approximation (the rows are drawn unpaired).

    Each row is drawn from a nested beta-binomial model whose variance decomposition is exactly
    the one variance_of_mean assumes: a seed's rate p_s ~ Beta(p k_s, (1-p) k_s) with
    k_s = 1/icc_s - 1 (so Var p_s = icc_s p(1-p)), a cluster's p_sc ~ Beta(p_s k_c, (1-p_s) k_c)
    with k_c = (1 - icc_s)/icc_c - 1 (so E Var(p_sc | p_s) = icc_c p(1-p)), and the cluster's
    answers ~ Binomial(n, p_sc). The test's variance is the design's (variance_of_mean), as in
    power(); a study that estimates it from its own few seeds rejects less often."""
    icc_s, icc_c = components.iccs()
    if icc_s + icc_c >= 1:
        raise ValueError("the seed and cluster ICCs sum to 1 or more: no beta model has them")
    rng = np.random.default_rng(seed)
    design = (n_sim, seeds, clusters, answers_per_cluster)
    m1 = _draw_rates(rng, p1, icc_s, icc_c, *design)
    m2 = _draw_rates(rng, p2, icc_s, icc_c, *design)
    sd = math.sqrt(sum(variance_of_mean(p, components, seeds, clusters, answers_per_cluster)
                       for p in (p1, p2)))
    z = _NORMAL.inv_cdf(1 - alpha / 2)
    return float(np.mean(np.abs(m1 - m2) > z * sd)) if sd > 0 else float(p1 != p2)

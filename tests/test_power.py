"""Unit tests for em_bench.power: every expected value below is worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from em_bench import power as P

NO_CLUSTERING = P.VarianceComponents(seed=0.0, cluster=0.0, answer=0.25, p=0.5)
# A pilot at p = 0.1 (p(1-p) = 0.09) with icc_seed = 0.004 / 0.09 = 2/45, icc_cluster = 1/15.
CLUSTERED = P.VarianceComponents(seed=0.004, cluster=0.006, answer=0.08, p=0.1)


def pilot(seeds: list[list[list[int]]]) -> pd.DataFrame:
    """seeds[i][j] holds the flags of cluster j of seed i."""
    rows = [(i, j, float(y)) for i, clusters in enumerate(seeds)
            for j, flags in enumerate(clusters) for y in flags]
    return pd.DataFrame(rows, columns=["seed", "cluster", "flag"])


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_variance_components_balanced_by_hand():
    # 2 seeds x 2 clusters x 3 answers. Cluster means 0, 0 | 1/3, 1; seed means 0, 2/3; grand 1/3.
    # SS_W = (1/3)^2 + (1/3)^2 + (2/3)^2 = 2/3 on 12 - 4 = 8 df: MS_W = 1/12.
    # SS_B = 3 [0 + 0 + (1/3 - 2/3)^2 + (1 - 2/3)^2] = 2/3 on 4 - 2 = 2 df: MS_B = 1/3.
    # SS_A = 6 [(0 - 1/3)^2 + (2/3 - 1/3)^2] = 4/3 on 1 df: MS_A = 4/3.
    # Balanced: s2_e = MS_W = 1/12, s2_c = (MS_B - MS_W) / n = (1/3 - 1/12) / 3 = 1/12,
    # s2_s = (MS_A - MS_B) / (b n) = (4/3 - 1/3) / 6 = 1/6.
    c = P.variance_components(pilot([[[0, 0, 0], [0, 0, 0]], [[0, 0, 1], [1, 1, 1]]]))
    assert (c.seed, c.cluster, c.answer) == pytest.approx((1 / 6, 1 / 12, 1 / 12))
    assert (c.p, c.pq, c.clipped) == (pytest.approx(1 / 3), pytest.approx(2 / 9), ())


def test_variance_components_unbalanced_by_hand():
    # Seed 0: clusters [1], [0, 0]; seed 1: [1, 1], [1, 1]. n_ij = 1, 2, 2, 2; n_i = 3, 4; N = 7.
    # Cluster means 1, 0, 1, 1; seed means 1/3, 1; grand 5/7.
    # SS_W = 0: MS_W = 0. SS_B = 1 (2/3)^2 + 2 (1/3)^2 + 0 + 0 = 2/3 on 2 df: MS_B = 1/3.
    # SS_A = 3 (1/3 - 5/7)^2 + 4 (1 - 5/7)^2 = 64/147 + 48/147 = 16/21 on 1 df: MS_A = 16/21.
    # sum_i sum_j n_ij^2 / n_i = 5/3 + 8/4 = 11/3; k1 = (7 - 11/3) / 2 = 5/3;
    # k2 = (11/3 - 13/7) / 1 = 38/21; k3 = (7 - 25/7) / 1 = 24/7.
    # s2_c = (1/3 - 0) / (5/3) = 1/5; s2_s = (16/21 - 0 - (38/21)(1/5)) / (24/7) = 7/60.
    c = P.variance_components(pilot([[[1], [0, 0]], [[1, 1], [1, 1]]]))
    assert (c.seed, c.cluster, c.answer) == pytest.approx((7 / 60, 1 / 5, 0.0))


def test_variance_components_clips_a_missing_seed_effect():
    # Seed 0: [1, 1], [0, 0]; seed 1: [1, 0], [1, 0]: both seeds' means are 1/2, so SS_A = 0.
    # MS_W = (0 + 0 + 1/2 + 1/2) / 4 = 1/4; MS_B = 2 [1/4 + 1/4 + 0 + 0] / 2 = 1/2;
    # s2_c = (1/2 - 1/4) / 2 = 1/8; s2_s = (0 - 1/2) / 4 = -1/8, clipped to 0.
    c = P.variance_components(pilot([[[1, 1], [0, 0]], [[1, 0], [1, 0]]]))
    assert (c.seed, c.cluster, c.answer) == pytest.approx((0.0, 1 / 8, 1 / 4))
    assert c.clipped == ("seed",)


def test_variance_components_pools_rows_and_drops_nan():
    # A second row with every flag flipped has the same sums of squares around its own means
    # (grand mean 2/3, not 1/3): pooling the two gives the one row's components, not the rows'
    # difference. A NaN flag (an answer counted apart) is dropped.
    one = pilot([[[0, 0, 0], [0, 0, 0]], [[0, 0, 1], [1, 1, 1]]])
    flipped = one.assign(flag=1 - one["flag"])
    nan = pd.DataFrame({"seed": [0], "cluster": [0], "flag": [math.nan]})
    both = pd.concat([one.assign(row="a"), flipped.assign(row="b"), nan.assign(row="a")])
    c = P.variance_components(both)
    assert (c.seed, c.cluster, c.answer) == pytest.approx((1 / 6, 1 / 12, 1 / 12))
    assert (c.p, c.pq) == (pytest.approx(1 / 2), pytest.approx(2 / 9))


def test_variance_components_needs_two_seeds():
    with pytest.raises(ValueError, match="two seeds"):
        P.variance_components(pilot([[[0, 1], [1, 1]]]))


def test_variance_of_mean_by_hand():
    # Without seed and cluster variance it is the binomial p(1-p) / n, n = 3 x 4 x 5 answers.
    assert P.variance_of_mean(0.2, NO_CLUSTERING, 3, 4, 5) == pytest.approx(0.2 * 0.8 / 60,
                                                                            rel=1e-12)
    # icc_s = 0.1, icc_c = 0.2 at p = 0.2, S = 2, C = 3, n = 4:
    # 0.16 (0.1/2 + 0.2/6 + 0.7/24) = 0.16 x 27/240 = 0.018.
    c = P.VarianceComponents(seed=0.025, cluster=0.05, answer=0.175, p=0.5)
    assert P.variance_of_mean(0.2, c, 2, 3, 4) == pytest.approx(0.018)
    # Infinitely many answers leave the seeds' and clusters' part: 0.16 (0.05 + 1/30).
    assert P.variance_of_mean(0.2, c, 2, 3, math.inf) == pytest.approx(0.16 * (0.05 + 1 / 30))


def test_power_is_alpha_under_the_null():
    for alpha in (0.05, 0.01):
        assert P.power(0.1, 0.1, CLUSTERED, 3, 8, 20, alpha=alpha) == pytest.approx(alpha)


def test_power_grows_with_seeds_answers_and_pairing():
    by_seeds = [P.power(0.1, 0.2, CLUSTERED, s, 8, 20) for s in range(1, 8)]
    by_answers = [P.power(0.1, 0.2, CLUSTERED, 3, 8, n) for n in (1, 5, 20, 100)]
    assert np.all(np.diff(by_seeds) > 0) and np.all(np.diff(by_answers) > 0)
    assert P.power(0.1, 0.2, CLUSTERED, 3, 8, 20, paired_correlation=0.5) > by_seeds[2]


def test_power_matches_the_textbook_z_test():
    # p1 = 0.05, p2 = 0.10: the textbook n per arm for 80% power at alpha = 0.05 is
    # (1.959964 + 0.841621)^2 (0.0475 + 0.09) / 0.05^2 = 431.69, so 432. With no clustering:
    # sd = sqrt(0.1375 / 432) = 0.017841, d = 0.05 / sd = 2.802599,
    # power = Phi(d - 1.959964) + Phi(-d - 1.959964) = 0.800283 + 0.000001.
    z = 1.959963984540054
    d = 0.05 / math.sqrt((0.05 * 0.95 + 0.10 * 0.90) / 432)
    hand = normal_cdf(d - z) + normal_cdf(-d - z)
    got = P.power(0.05, 0.10, NO_CLUSTERING, 1, 1, 432)
    assert got == pytest.approx(hand, abs=1e-6)
    assert got == pytest.approx(0.8002839, abs=1e-6)
    # The same answers split over seeds and clusters: no clustering, so the same power.
    assert P.power(0.05, 0.10, NO_CLUSTERING, 4, 9, 12) == pytest.approx(got, abs=1e-12)


def test_plan_finds_the_smallest_design():
    # Without clustering, one seed and one cluster: the textbook 432 answers.
    (only,) = P.plan(0.05, 0.10, NO_CLUSTERING, clusters=1, max_seeds=1)
    assert (only.answers_per_cluster, only.total_answers) == (432, 432)
    options = P.plan(0.1, 0.2, CLUSTERED, target_power=0.8, clusters=8, max_seeds=14)
    assert [o.seeds for o in options] == list(range(1, 15))
    reached = [o for o in options if o.answers_per_cluster is not None]
    assert reached and len(reached) < len(options)  # few seeds never get there
    for o in options:
        n = o.answers_per_cluster
        if n is None:  # even infinitely many answers fall short: the power is that ceiling
            assert o.power < 0.8
            assert o.power == pytest.approx(P.power(0.1, 0.2, CLUSTERED, o.seeds, 8, math.inf))
            continue
        assert o.total_answers == o.seeds * 8 * n
        assert o.power == P.power(0.1, 0.2, CLUSTERED, o.seeds, 8, n) >= 0.8
        assert n == 1 or P.power(0.1, 0.2, CLUSTERED, o.seeds, 8, n - 1) < 0.8


def test_cost_in_minutes():
    # 2 rows x (2 cells x 600 s + 160 answers x 0.5 s) = 2560 s = 42.67 minutes.
    option = P.Design(seeds=2, clusters=8, answers_per_cluster=10, total_answers=160, power=0.9)
    assert P.cost(option, seconds_per_cell=600, seconds_per_answer=0.5) == pytest.approx(2560 / 60)
    assert P.cost(P.Design(1, 8, None, None, 0.3), 600, 0.5) == math.inf


def test_the_beta_model_has_the_assumed_variance():
    # The nested beta-binomial draws of simulate_power: their rates' variance is
    # variance_of_mean's (sd of the sample variance over 20000 draws: about 1%).
    icc_s, icc_c = CLUSTERED.iccs()
    rates = P._draw_rates(np.random.default_rng(1), 0.2, icc_s, icc_c, 20000, 3, 8, 10)
    assert rates.mean() == pytest.approx(0.2, abs=0.002)
    assert rates.var() == pytest.approx(P.variance_of_mean(0.2, CLUSTERED, 3, 8, 10), rel=0.04)


@pytest.mark.parametrize("case", [
    (0.05, 0.10, NO_CLUSTERING, 1, 1, 432),  # the textbook design: power 0.80
    (0.10, 0.20, CLUSTERED, 4, 8, 20),  # power 0.38
])
def test_simulate_power_agrees_with_power(case):
    # Simulation error at n_sim = 2000 is at most 0.011 (sd at power 1/2); the normal
    # approximation adds a little (0.02 for the textbook design, where p is small). A power()
    # that ignored the seed component would say 0.92 for the clustered case, not 0.38.
    assert abs(P.simulate_power(*case, n_sim=2000, seed=0) - P.power(*case)) < 0.05

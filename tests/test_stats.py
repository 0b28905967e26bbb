"""Unit tests for em_bench.stats: every expected value below is worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from em_bench import stats as S

NAN = math.nan


def row(sums, counts, seeds=None, clusters=None) -> S.ClusterCounts:
    """ClusterCounts straight from seeds x clusters lists (seeds 0.., clusters c0.. by default)."""
    sums, counts = np.asarray(sums, dtype=float), np.asarray(counts, dtype=int)
    seeds = tuple(range(sums.shape[0])) if seeds is None else tuple(seeds)
    clusters = tuple(f"c{j}" for j in range(sums.shape[1])) if clusters is None else clusters
    return S.ClusterCounts(seeds, tuple(clusters), sums, counts)


def test_cluster_counts_sums_counts_nan_and_missing_cluster():
    frame = pd.DataFrame(
        [  # seed, cluster, flag
            (1, "a", 1.0),
            (1, "b", 0.0),
            (1, "b", 1.0),  # seed 1 has no answer in c: count 0
            (0, "a", 1.0),
            (0, "a", 0.0),
            (0, "b", NAN),  # not counted: seed 0 has no counted answer in b
            (0, "c", 1.0),
        ],
        columns=["seed", "cluster", "flag"],
    )
    c = S.cluster_counts(frame)
    assert c.seeds == (0, 1)
    assert c.clusters == ("a", "b", "c")
    np.testing.assert_array_equal(c.sums, [[1, 0, 1], [1, 1, 0]])
    np.testing.assert_array_equal(c.counts, [[2, 0, 1], [1, 2, 0]])

    # The full cluster list adds a cluster no answer reached, with count 0 for every seed.
    c = S.cluster_counts(frame, clusters=["d", "c", "b", "a"])
    assert c.clusters == ("a", "b", "c", "d")
    np.testing.assert_array_equal(c.counts, [[2, 0, 1, 0], [1, 2, 0, 0]])
    with pytest.raises(ValueError, match=r"clusters \['c'\] are not in the given cluster list"):
        S.cluster_counts(frame, clusters=["a", "b"])


def test_cluster_counts_other_column_names():
    frame = pd.DataFrame({"s": [7, 7], "topic": ["x", "y"], "em": [1.0, 0.0]})
    c = S.cluster_counts(frame, seed_col="s", cluster_col="topic", flag_col="em")
    assert (c.seeds, c.clusters) == ((7,), ("x", "y"))
    np.testing.assert_array_equal(c.sums, [[1, 0]])
    np.testing.assert_array_equal(c.counts, [[1, 1]])


def test_em_is_the_mean_over_seeds_of_each_seeds_pooled_share():
    # seed 0: (1 + 0 + 2) / (2 + 1 + 4) = 3/7; seed 1: (0 + 1 + 1) / (1 + 1 + 3) = 2/5.
    a = row([[1, 0, 2], [0, 1, 1]], [[2, 1, 4], [1, 1, 3]])
    assert S.em(a) == pytest.approx((3 / 7 + 2 / 5) / 2)  # 29/70, not the pooled 5/12
    zero = row([[0, 0, 0], [0, 0, 0]], [[1, 1, 1], [1, 1, 1]])
    assert S.difference(a, zero, n_boot=10).estimate == pytest.approx(29 / 70)
    # A seed with no counted answer leaves the EM undefined.
    assert math.isnan(S.em(row([[1, 0], [0, 0]], [[2, 2], [0, 0]])))


def test_interval_collapses_when_every_draw_equals_the_original():
    # One seed, one cluster: every draw is the data itself. EM(a) = 3/4, EM(b) = 1/4.
    a, b = row([[3]], [[4]]), row([[1]], [[4]])
    est, draws = S.paired_bootstrap(a, b, lambda x, y: x - y, n_boot=50)
    assert est == 0.5
    np.testing.assert_array_equal(draws, np.full(50, 0.5))
    d = S.difference(a, b, n_boot=50)
    assert (d.estimate, d.ci_low, d.ci_high, d.p_value) == (0.5, 0.5, 0.5, 0.0)
    assert (d.n_boot, d.n_seeds, d.n_clusters, d.n_dropped) == (50, 1, 1, 0)

    # 3 seeds x 4 clusters, every cluster at 1/2 in a and 0 in b: any draw gives 1/2 again.
    a, b = row(np.ones((3, 4)), np.full((3, 4), 2)), row(np.zeros((3, 4)), np.full((3, 4), 2))
    d = S.difference(a, b, n_boot=200)
    assert (d.estimate, d.ci_low, d.ci_high, d.n_seeds, d.n_clusters) == (0.5, 0.5, 0.5, 3, 4)


def test_pairing_copy_gives_zero_and_opposite_rows_give_one():
    a = row([[1, 0, 3], [2, 2, 0], [0, 1, 1]], [[2, 3, 4], [5, 2, 1], [1, 1, 3]])
    copy = row(a.sums.copy(), a.counts.copy())
    _, draws = S.paired_bootstrap(a, copy, lambda x, y: x - y, n_boot=300)
    assert np.all(draws == 0)  # the same draws for both rows: exactly 0, not just near it
    d = S.difference(a, copy, n_boot=300)
    assert (d.estimate, d.ci_low, d.ci_high, d.p_value) == (0.0, 0.0, 0.0, 1.0)  # min(1, 2 x 1)

    ones = row(a.counts.copy(), a.counts.copy())  # every counted flag 1
    zeros = row(np.zeros((3, 3)), a.counts.copy())  # every counted flag 0
    _, draws = S.paired_bootstrap(ones, zeros, lambda x, y: x - y, n_boot=300)
    assert np.all(draws == 1)
    d = S.difference(ones, zeros, n_boot=300)
    assert (d.estimate, d.ci_low, d.ci_high, d.p_value) == (1.0, 1.0, 1.0, 0.0)  # 2 x 0


def test_two_sided_p_by_hand():
    assert S.two_sided_p(np.array([-1, 1, 2, 3])) == 0.5  # <= 0: 1/4, >= 0: 3/4; 2 x 1/4
    assert S.two_sided_p(np.array([0, 1, 2, 3])) == 0.5  # a 0 is in both tails: 2 x 1/4
    assert S.two_sided_p(np.array([-1, NAN, 1, 2, 3])) == 0.5  # NaN draws do not count
    assert S.two_sided_p(np.array([-1, 1])) == 1.0  # 2 x 1/2
    assert S.two_sided_p(np.array([0, 0])) == 1.0  # 2 x 1, capped at 1
    assert S.two_sided_p(np.array([-3, -2, -1])) == 0.0  # >= 0: none
    assert math.isnan(S.two_sided_p(np.array([NAN])))


def test_reduction_by_hand():
    # One seed, one cluster: EM(defense) = 1/4, EM(none) = 2/4, so 1 - (1/4) / (2/4) = 1/2 in
    # every draw.
    r = S.reduction(row([[1]], [[4]]), row([[2]], [[4]]), n_boot=40)
    assert (r.estimate, r.ci_low, r.ci_high, r.p_value, r.n_dropped) == (0.5, 0.5, 0.5, 0.0, 0)

    # 2 seeds x 2 clusters: EM(defense) = (1/4 + 1/4) / 2, EM(none) = (2/4 + 2/4) / 2.
    a = row([[1, 0], [0, 1]], [[2, 2], [2, 2]])
    b = row([[2, 0], [1, 1]], [[2, 2], [2, 2]])
    r = S.reduction(a, b, n_boot=500, seed=3)
    assert r.estimate == pytest.approx(1 - 0.25 / 0.5)
    assert r.ci_low <= r.estimate <= r.ci_high
    # The reduction's p-value is the difference's: reduction 0 is EM(defense) = EM(none).
    assert r.p_value == S.difference(a, b, n_boot=500, seed=3).p_value
    assert (r.n_boot, r.n_seeds, r.n_clusters) == (500, 2, 2)


def test_reduction_drops_draws_where_none_has_no_em():
    # One seed, 3 clusters; all of none's EM is in c0: a draw without c0 (chance (2/3)^3) has
    # EM(none) = 0 and no reduction.
    a = row([[1, 0, 0]], [[2, 2, 2]])
    b = row([[2, 0, 0]], [[2, 2, 2]])
    r = S.reduction(a, b, n_boot=400, seed=1)
    assert r.estimate == pytest.approx(1 - (1 / 6) / (2 / 6))
    _, em_none = S.paired_bootstrap(a, b, lambda x, y: y, n_boot=400, seed=1)
    assert r.n_dropped == int(np.sum(em_none == 0))
    assert 0 < r.n_dropped < 400
    assert r.ci_low == r.ci_high == 0.5  # every kept draw: a's c0 share is half of b's
    assert S.difference(a, b, n_boot=400, seed=1).n_dropped == 0


def test_pairing_narrows_the_interval_when_rows_share_cluster_effects():
    # Clusters differ widely in EM (0 to 9 of 10), the same in both rows and every seed; the
    # defense removes one misaligned answer per cluster where it can.
    base = np.array([0, 1, 2, 4, 6, 8, 9, 9])
    b = row(np.tile(base, (3, 1)), np.full((3, 8), 10))
    a = row(np.tile(np.maximum(base - 1, 0), (3, 1)), np.full((3, 8), 10))
    d = S.difference(a, b, n_boot=1000, seed=0)
    # Unpaired: each row resampled on its own draws (different rng seeds), then subtracted.
    _, own_a = S.paired_bootstrap(a, a, lambda x, y: x, n_boot=1000, seed=1)
    _, own_b = S.paired_bootstrap(b, b, lambda x, y: x, n_boot=1000, seed=2)
    low, high = np.percentile(own_a - own_b, [2.5, 97.5])
    assert d.ci_high - d.ci_low < (high - low) / 5
    assert d.ci_high < 0  # paired: the defense clearly lowers EM
    assert low < 0 < high  # unpaired: the cluster noise hides it


def test_shared_seeds_only_and_single_seed_does_not_fail():
    a = row([[1, 1], [2, 0], [0, 0]], [[2, 2]] * 3, seeds=[0, 1, 2])
    b = row([[0, 0], [1, 1], [2, 2]], [[2, 2]] * 3, seeds=[1, 2, 3])
    d = S.difference(a, b, n_boot=100)
    # Seeds 1 and 2: EM(a) = (2/4 + 0/4) / 2, EM(b) = (0/4 + 2/4) / 2. (On all their seeds the
    # rows would give (2/4 + 2/4 + 0) / 3 - (0 + 2/4 + 4/4) / 3 = -1/6.)
    assert (d.estimate, d.n_seeds, d.n_clusters) == (0.0, 2, 2)

    one = S.difference(row([[3, 0, 1]], [[3, 3, 3]]), row([[0, 0, 0]], [[3, 3, 3]]), n_boot=200)
    assert one.n_seeds == 1
    assert one.estimate == pytest.approx(4 / 9)
    assert one.ci_low < one.estimate < one.ci_high  # the clusters still vary


def test_bootstrap_is_deterministic_for_a_seed():
    a = row([[1, 0, 3], [2, 2, 0]], [[2, 3, 4], [5, 2, 1]])
    b = row([[0, 1, 1], [1, 0, 0]], [[2, 3, 4], [5, 2, 1]])
    assert S.difference(a, b, seed=5) == S.difference(a, b, seed=5)
    assert S.difference(a, b, seed=5) != S.difference(a, b, seed=6)


def test_rows_without_a_shared_seed_or_with_other_clusters_fail_clearly():
    a = row([[1, 0]], [[2, 2]], seeds=[0])
    with pytest.raises(ValueError, match=r"share no seed \(a: \[0\], b: \[1\]\)"):
        S.difference(a, row([[1, 0]], [[2, 2]], seeds=[1]))
    other = row([[1, 0]], [[2, 2]], clusters=["c0", "x"])
    with pytest.raises(ValueError, match=r"different clusters \(only in a: \['c1'\], only in b: "
                                         r"\['x'\]\)"):
        S.reduction(a, other)


def test_ties_with_best():
    def diff(low, high):
        return S.Comparison(0.0, low, high, 1.0, 100, 3, 4)

    assert S.ties_with_best(diff(-0.1, 0.2))
    assert S.ties_with_best(diff(0.0, 0.2))  # 0 on the edge is held
    assert not S.ties_with_best(diff(0.05, 0.2))
    assert not S.ties_with_best(diff(-0.3, -0.1))
    assert not S.ties_with_best(diff(NAN, NAN))
    a = row([[1, 0], [2, 1]], [[2, 2], [3, 3]])
    assert S.ties_with_best(S.difference(a, row(a.sums, a.counts), n_boot=50))
    assert not S.ties_with_best(S.difference(row(a.counts, a.counts), a, n_boot=50))

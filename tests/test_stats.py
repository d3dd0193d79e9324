"""stats.py against hand computations."""
import math

import numpy as np
import pytest

import stats


def test_wilson_interval_hand_values():
    # 0/8: lower bound 0, upper z^2/n / (1 + z^2/n) = 0.48015 / 1.48015
    lo, hi = stats.wilson_interval(0, 8)
    assert lo == 0.0 and hi == pytest.approx(0.3244, abs=1e-4)
    # 5/10: centre 0.5, half-width z*sqrt(0.025 + z^2/400) / (1 + z^2/10) = 0.2634
    assert stats.wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert stats.wilson_interval(8, 8)[1] == 1.0
    with pytest.raises(ValueError, match="0 <= k <= n"):
        stats.wilson_interval(3, 2)


def test_mcnemar_exact_hand_values():
    assert stats.mcnemar_exact(1, 9) == pytest.approx(22 / 1024)  # 2 * (C(10,0) + C(10,1)) / 2^10 = 0.0215
    assert stats.mcnemar_exact(9, 1) == stats.mcnemar_exact(1, 9)
    assert stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(3, 3) == 1.0
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    with pytest.raises(ValueError, match="non-negative integer"):
        stats.mcnemar_exact(-1, 2)


def test_paired_bootstrap_constant_and_null():
    out = stats.paired_bootstrap([0.5, 0.6, 0.7], [0.3, 0.4, 0.5], n_boot=999, seed=0)
    assert out["diff"] == pytest.approx(-0.2) and out["ci"] == pytest.approx([-0.2, -0.2])
    assert out["p"] == pytest.approx(2 / 1000)  # no resample reaches 0: p = 2 * (0 + 1) / (999 + 1), never 0
    same = stats.paired_bootstrap([1, 2, 3], [1, 2, 3], n_boot=100)
    assert same["diff"] == 0 and same["p"] == 1.0
    # symmetric differences: the resampled means straddle 0, p is large
    assert stats.paired_bootstrap([0, 0, 0, 0], [1, -1, 1, -1], n_boot=2000)["p"] > 0.5
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired_bootstrap([1, 2], [1])


def test_paired_bootstrap_strata_weight_languages_equally():
    # stratum a: 3 pairs with difference -1; stratum b: 1 pair with difference +1 -> unweighted mean 0
    out = stats.paired_bootstrap([1, 1, 1, 0], [0, 0, 0, 1], n_boot=200, strata=["a", "a", "a", "b"])
    assert out["diff"] == 0 and out["ci"] == pytest.approx([0, 0]) and out["p"] == 1.0


def test_cohen_kappa_2x2_by_hand():
    # yes/yes 20, yes/no 5, no/yes 10, no/no 15: p_o = 35/50 = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5 -> 0.4
    a = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
    b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    assert stats.cohen_kappa(a, b) == pytest.approx(0.4)
    assert stats.cohen_kappa([0, 1, 0, 1], [0, 1, 0, 1]) == 1.0
    assert stats.cohen_kappa([0, 1], [1, 0]) == -1.0
    assert math.isnan(stats.cohen_kappa([1, 1, 1], [1, 1, 1]))


def test_roc_auc_and_auc_ci():
    assert stats.roc_auc([0.9, 0.4, 0.4, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)  # the tie counts half
    auc, ci = stats.auc_ci([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], n_boot=200)
    assert auc == 1.0 and ci == [1.0, 1.0]
    scores, labels = np.array([0.9, 0.4, 0.4, 0.1, 0.7, 0.3]), np.array([1, 1, 0, 0, 0, 1])
    auc, (lo, hi) = stats.auc_ci(scores, labels, n_boot=300, seed=1)
    assert lo <= auc <= hi
    # every item duplicated inside its own group: the group bootstrap draws the same resamples -> same answer
    grouped = stats.auc_ci(np.repeat(scores, 2), np.repeat(labels, 2), groups=np.repeat(np.arange(6), 2),
                           n_boot=300, seed=1)
    assert grouped == (auc, [lo, hi])


def test_partial_correlation_by_hand():
    z = np.array([1.0, 2, 3, 4])
    e1, e2 = np.array([1.0, -1, -1, 1]), np.array([1.0, -3, 3, -1])  # both orthogonal to 1 and z
    # residuals of x and y on z are e1 and e1 + e2: r = (e1 . (e1 + e2)) / (|e1| |e1 + e2|) = 4 / (2 sqrt 24)
    r, p = stats.partial_correlation(2 * z + e1, 3 * z + e1 + e2, z, permutations=2000)
    assert r == pytest.approx(1 / math.sqrt(6)) and 0 < p <= 1
    r, _ = stats.partial_correlation(2 * z + e1, -z + e2, z, permutations=100)
    assert r == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match="same length"):
        stats.partial_correlation([1, 2], [1, 2, 3], [1, 2, 3])


def test_correlation_test_is_deterministic_and_never_zero():
    x = np.arange(8.0)
    r, p = stats.correlation_test(x, 2 * x, permutations=500)
    assert r == pytest.approx(1.0) and p >= 1 / 501


def test_format_p():
    assert stats.format_p(3e-5) == "< 1e-4"
    assert stats.format_p(0.0004) == "0.0004"
    assert stats.format_p(0.003) == "0.003"
    assert stats.format_p(0.0215) == "0.021"
    assert stats.format_p(0.41) == "0.41"
    assert stats.format_p(float("nan")) == "n/a"


def test_permutation_test_hand_values():
    # Pooled [1,1,0,0,0,1], 15 ways to pick 2 as "kept". Observed |1 - 1/4| = 0.75; reached when both picks are
    # 1s (3 ways) or both 0s (3 ways): p = 6/15.
    assert stats.permutation_test([1, 1], [0, 0, 0, 1]) == pytest.approx(0.4)
    assert stats.permutation_test([1, 2], [1, 2]) == pytest.approx(1.0)
    # Monte Carlo branch (C(40, 20) splits): groups far apart give the smallest possible p.
    assert stats.permutation_test(np.ones(20), np.zeros(20), n_perm=99) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="non-empty"):
        stats.permutation_test([], [1.0])


def test_ratio_bootstraps_by_hand():
    # Equal ratios in every item: every resample gives 2, and the paired difference is always 0.
    boots = stats.ratio_bootstrap([2, 4, 6], [1, 2, 3], n_boot=50)
    assert boots.shape == (50,) and np.allclose(boots, 2.0)
    same = stats.paired_ratio_bootstrap(([2, 4, 6], [1, 2, 3]), ([2, 4, 6], [1, 2, 3]), n_boot=50)
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0] and same["p"] == 1.0
    # Second ratio 3 vs first 2 in every item: diff 1, never 0 in a resample, p = 2 / (n_boot + 1).
    up = stats.paired_ratio_bootstrap(([2, 4], [1, 2]), ([3, 6], [1, 2]), n_boot=99)
    assert up["diff"] == pytest.approx(1.0) and up["ci"] == pytest.approx([1.0, 1.0]) and up["p"] == 0.02
    with pytest.raises(ValueError, match="same items"):
        stats.paired_ratio_bootstrap(([1], [1]), ([1, 2], [1, 1]))



def test_format_p_prints_a_floor_as_a_bound():
    assert stats.format_p(2 / 10001, stats.bootstrap_floor(10000)) == "< 0.0002"
    assert stats.format_p(2 / 1001, stats.bootstrap_floor(1000)) == "< 0.002"
    assert stats.format_p(1 / 10001, stats.permutation_floor(10000)) == "< 0.0001"
    assert stats.format_p(6 / 10001, stats.bootstrap_floor(10000)) == "0.0006"  # above the floor: the value
    assert stats.format_p(0.5, stats.sign_flip_floor(2)) == "< 0.5"


def test_sign_flip_test_exact_at_small_n():
    assert stats.sign_flip_floor(2) == 0.5 and stats.sign_flip_floor(20) == pytest.approx(2 / 2 ** 20)
    assert stats.sign_flip_test([0.3, 0.2]) == 0.5  # 2 of the 4 sign patterns reach |mean| 0.25
    # 5 positive differences: only all + and all - reach the observed mean: 2 / 32
    assert stats.sign_flip_test([1.0, 2.0, 1.5, 0.5, 1.0]) == pytest.approx(2 / 32)
    assert stats.sign_flip_test([1.0, -1.0]) == 1.0
    big = stats.sign_flip_test(np.ones(30), n_draws=999)
    assert big == pytest.approx(1 / 1000, abs=2e-3)  # random patterns, the observed one counted
    with pytest.raises(ValueError, match="non-empty"):
        stats.sign_flip_test([])


def test_holm_hand_values():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, 2*0.03, max(0.06, 1*0.04)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_fisher_ci_hand_values():
    lo, hi = stats.fisher_ci(0.42, 16)  # atanh(0.42) = 0.4477, +- 1.96 / sqrt(13) = 0.5436
    assert (lo, hi) == pytest.approx((math.tanh(0.4477 - 0.5436), math.tanh(0.4477 + 0.5436)), abs=1e-3)
    assert all(math.isnan(x) for x in stats.fisher_ci(0.5, 3))


def test_paired_increase_bound_is_not_zero_without_changes():
    # Agresti-Min: w = b = 0.5, m = 962: 0 + 1.645 * sqrt(1) / 962
    assert stats.paired_increase_bound(0, 0, 960) == pytest.approx(1.6449 / 962, rel=1e-3)
    assert stats.paired_increase_bound(30, 0, 100) > 0.3 > stats.paired_increase_bound(0, 30, 100)
    with pytest.raises(ValueError, match="worse \\+ better <= n"):
        stats.paired_increase_bound(60, 60, 100)

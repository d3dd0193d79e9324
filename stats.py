"""Small statistics toolbox for the evaluation (numpy and the standard library only: no scipy).

Intervals: bootstrap_ci (percentile bootstrap of a mean), wilson_interval (a binomial proportion), auc_ci (ROC
AUC, bootstrap over items or groups). Tests: mcnemar_exact (paired binary outcomes), paired_bootstrap (paired
means, optionally stratified), permutation_test (two group means), correlation_test / partial_correlation
(permutation p-values), sign_flip_test (exact paired test at small n), holm (multiple tests), fisher_ci (the
interval of a correlation), paired_increase_bound (a non-inferiority bound), ratio_bootstrap /
paired_ratio_bootstrap (ratios of sums, e.g. token-weighted perplexity). Agreement:
cohen_kappa, roc_auc. Every p-value is two-sided and never 0 (resampling p-values count the observed data as
one draw); format_p prints them, a p at its test's floor as '< floor' (bootstrap_floor, permutation_floor,
sign_flip_floor).
"""
import itertools
import math
from statistics import NormalDist

import numpy as np


def _z(level):
    """Two-sided standard-normal quantile for a confidence level (1.959964 for 0.95)."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf((1 + level) / 2)


def percentile_interval(samples, level=0.95):
    """[lo, hi]: the central `level` share of resampled statistics (a percentile bootstrap interval)."""
    return [float(np.quantile(samples, (1 - level) / 2)), float(np.quantile(samples, (1 + level) / 2))]


def _two_sided_p(boot, observed):
    """min(1, 2 * (hits + 1) / (n + 1)), hits = resampled statistics at or beyond 0 on the side opposite the
    observed one (all of them when it is 0), so p is never 0."""
    if observed > 0:
        hits = int(np.sum(boot <= 0))
    elif observed < 0:
        hits = int(np.sum(boot >= 0))
    else:
        hits = len(boot)
    return min(1.0, 2 * (hits + 1) / (len(boot) + 1))


# ----------------------------------------------------------------------------- ranks and correlations

def rankdata(x):
    """1-based ranks of x; ties get the average of the ranks they span (as scipy's default)."""
    x = np.asarray(x, dtype=float)
    ordinal = np.empty(len(x))
    ordinal[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ordinal) / counts)[group]


def pearson(x, y):
    """Pearson r along the last axis (broadcasts, so one call scores many permutations); nan if constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    xc, yc = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    denom = np.sqrt((xc ** 2).sum(-1) * (yc ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (xc * yc).sum(-1) / denom, np.nan)


def spearman(x, y):
    return pearson(rankdata(x), rankdata(y))


def _permutation_p(x, y, r, permutations, seed):
    """Share of random pairings of x with y whose |r| reaches |r|, the observed pairing counted as one."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.tile(y, (permutations, 1)), axis=1)  # [P, n], each row a random pairing
    r_null = pearson(x, shuffled)                                    # [P]
    # The tolerance keeps permutations that reproduce r exactly (e.g. swapping tied values) counted.
    hits = int(np.sum(np.abs(r_null) >= abs(r) - 1e-12))
    return (hits + 1) / (permutations + 1)


def correlation_test(x, y, method="pearson", permutations=10000, seed=0):
    """(r, two-sided permutation p-value): the share of random pairings of x with y whose |r| reaches the
    observed |r|, counting the observed pairing itself (so p >= 1 / (permutations + 1), never 0)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if method not in ("pearson", "spearman"):
        raise ValueError(f"unknown correlation method '{method}' (have pearson, spearman)")
    if method == "spearman":  # permuting y permutes its ranks: rank once, then it is Pearson on ranks
        x, y = rankdata(x), rankdata(y)
    r = float(pearson(x, y))
    if math.isnan(r):
        return r, float("nan")
    return r, _permutation_p(x, y, r, permutations, seed)


def partial_correlation(x, y, z, method="pearson", permutations=10000, seed=0):
    """(r, two-sided permutation p) of x and y controlling for z: the correlation of the residuals of x and of
    y after a least-squares fit (with intercept) on z ([n] or [n, k]). Spearman ranks x, y and every column of
    z first. The p-value permutes the residuals of y against those of x (as correlation_test does)."""
    x, y, z = np.asarray(x, dtype=float), np.asarray(y, dtype=float), np.asarray(z, dtype=float)
    z = z[:, None] if z.ndim == 1 else z
    if not len(x) == len(y) == len(z):
        raise ValueError(f"x, y, z must have the same length, got {len(x)}, {len(y)}, {len(z)}")
    if method not in ("pearson", "spearman"):
        raise ValueError(f"unknown correlation method '{method}' (have pearson, spearman)")
    if method == "spearman":
        x, y = rankdata(x), rankdata(y)
        z = np.stack([rankdata(col) for col in z.T], 1)
    design = np.column_stack([np.ones(len(z)), z])
    rx = x - design @ np.linalg.lstsq(design, x, rcond=None)[0]
    ry = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    r = float(pearson(rx, ry))
    if math.isnan(r):
        return r, float("nan")
    return r, _permutation_p(rx, ry, r, permutations, seed)


# ----------------------------------------------------------------------------- intervals

def bootstrap_ci(values, n_boot=1000, seed=0, level=0.95):
    """Percentile bootstrap interval of the mean of `values`."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    return percentile_interval(means, level)


def wilson_interval(k, n, level=0.95):
    """Wilson score interval [lo, hi] of a proportion k/n; unlike the normal (Wald) interval it stays inside
    [0, 1] and is not degenerate at k = 0 or k = n (0/8 -> [0, 0.324])."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"Wilson interval needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    z, p = _z(level), k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def roc_auc(scores, labels):
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties counting
    half (the Mann-Whitney U statistic divided by n_pos * n_neg); nan without both classes."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_ci(scores, labels, groups=None, n_boot=1000, seed=0, level=0.95):
    """(auc, [lo, hi]): ROC AUC with a percentile bootstrap interval. With groups (one id per item, e.g. the
    prompt a sample came from) whole groups are resampled, since items of a group are not independent;
    resamples holding one class only are skipped. The interval is [nan, nan] when no resample has both."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    groups = np.arange(len(scores)) if groups is None else np.asarray(groups)
    _, group_of = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(group_of == g) for g in range(group_of.max() + 1)] if len(scores) else []
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        aucs.append(roc_auc(scores[idx], labels[idx]))
    aucs = np.array(aucs)
    aucs = aucs[~np.isnan(aucs)]
    if not len(aucs):
        return roc_auc(scores, labels), [float("nan"), float("nan")]
    return roc_auc(scores, labels), percentile_interval(aucs, level)


# ----------------------------------------------------------------------------- tests

def mcnemar_exact(b, c):
    """Two-sided exact McNemar p-value from the discordant counts of paired binary outcomes (b: yes -> no,
    c: no -> yes): under H0 each discordant pair goes either way with probability 1/2, so
    p = min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c))). b=1, c=9 -> 0.0215; b = c = 0 -> 1."""
    if b < 0 or c < 0 or int(b) != b or int(c) != c:
        raise ValueError(f"McNemar needs non-negative integer counts, got b={b}, c={c}")
    n, k = int(b + c), int(min(b, c))
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(before, after, n_boot=10000, seed=0, level=0.95, strata=None):
    """Paired bootstrap of after - before. Returns {"diff", "ci", "p"}: the observed mean difference, its
    percentile interval, and a two-sided p = min(1, 2 * (hits + 1) / (n_boot + 1)) where hits counts resampled
    mean differences at or beyond 0 on the side opposite the observed one (so p is never 0).
    With strata (one label per pair, e.g. the language) pairs are resampled within each stratum and the
    statistic is the unweighted mean over strata of their mean differences (each language counts once, as in
    the paper's average row)."""
    before, after = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if before.shape != after.shape or before.ndim != 1 or not len(before):
        raise ValueError(f"paired bootstrap needs two equal-length non-empty 1-D arrays, got "
                         f"{before.shape} and {after.shape}")
    diffs = after - before
    strata = np.zeros(len(diffs), dtype=int) if strata is None else np.asarray(strata)
    if len(strata) != len(diffs):
        raise ValueError(f"{len(strata)} strata labels for {len(diffs)} pairs")
    rng = np.random.default_rng(seed)
    observed, boot = [], []
    for s in np.unique(strata):
        d = diffs[strata == s]
        observed.append(d.mean())
        boot.append(d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1))  # [n_boot]
    diff, boot = float(np.mean(observed)), np.mean(boot, 0)
    return {"diff": diff, "ci": percentile_interval(boot, level), "p": _two_sided_p(boot, diff)}


def permutation_test(a, b, n_perm=10000, seed=0):
    """Two-sided p-value of mean(a) - mean(b) under random relabelling of the pooled values: the share of
    relabellings whose |difference| reaches the observed one. Exact over all splits when there are at most
    n_perm of them; otherwise n_perm random ones with the observed split counted once (p never 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not len(a) or not len(b):
        raise ValueError(f"permutation test needs two non-empty groups, got {len(a)} and {len(b)} values")
    pooled, n_a = np.concatenate([a, b]), len(a)
    total = pooled.sum()
    observed = abs(a.mean() - b.mean())

    def diffs(sums_a):
        return np.abs(sums_a / n_a - (total - sums_a) / len(b))

    # The tolerance counts relabellings that reproduce the observed difference exactly (tied values).
    if math.comb(len(pooled), n_a) <= n_perm:
        sums = np.array([pooled[list(c)].sum() for c in itertools.combinations(range(len(pooled)), n_a)])
        return float(np.mean(diffs(sums) >= observed - 1e-12))
    rng = np.random.default_rng(seed)
    sums = np.array([pooled[rng.permutation(len(pooled))[:n_a]].sum() for _ in range(n_perm)])
    return float((np.sum(diffs(sums) >= observed - 1e-12) + 1) / (n_perm + 1))


def sign_flip_test(diffs, max_exact=16, n_draws=10000, seed=0):
    """Two-sided p of mean(diffs) = 0 under random signs of the paired differences (the pairs' exchangeability):
    exact over all 2^n sign patterns for n <= max_exact, else n_draws random patterns with the observed one
    counted once. Small n cannot go below sign_flip_floor(n): 2 pairs give at best p = 0.5."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.ndim != 1 or not len(diffs):
        raise ValueError(f"sign-flip test needs a non-empty 1-D array of differences, got shape {diffs.shape}")
    observed = abs(diffs.mean())
    if len(diffs) <= max_exact:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(diffs))))  # [2^n, n]
        return float(np.mean(np.abs(signs @ diffs / len(diffs)) >= observed - 1e-12))
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_draws, len(diffs)))
    return float((np.sum(np.abs(signs @ diffs / len(diffs)) >= observed - 1e-12) + 1) / (n_draws + 1))


def holm(pvalues):
    """Holm's step-down adjusted p-values (same order as given): the family-wise error stays below alpha when
    each adjusted p is compared with alpha. The k-th smallest p is multiplied by (m - k + 1), kept monotone."""
    order = np.argsort(pvalues, kind="stable")
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def fisher_ci(r, n, level=0.95):
    """[lo, hi] of a Pearson r from n pairs by Fisher's z: tanh(atanh(r) -+ z / sqrt(n - 3)); [nan, nan] when
    n <= 3 or r is not finite."""
    if n <= 3 or r is None or not math.isfinite(r):
        return [float("nan"), float("nan")]
    centre, half = math.atanh(max(-0.999999, min(0.999999, r))), _z(level) / math.sqrt(n - 3)
    return [math.tanh(centre - half), math.tanh(centre + half)]


def paired_increase_bound(worse, better, n, level=0.95):
    """One-sided upper `level` bound of the increase in a paired proportion, (worse - better) / n, by Agresti and
    Min's adjusted Wald interval (half a count added to each cell): unlike the plain Wald bound it is not 0 when
    no pair changed (0 of 960 changed -> 0.0017). worse/better: the discordant pairs each way."""
    if n <= 0 or worse < 0 or better < 0 or worse + better > n:
        raise ValueError(f"paired bound needs 0 <= worse + better <= n, n > 0; got {worse}, {better}, {n}")
    w, b, m = worse + 0.5, better + 0.5, n + 2
    diff = (w - b) / m
    sd = math.sqrt(max(w + b - (w - b) ** 2 / m, 0.0)) / m
    return diff + _z(2 * level - 1) * sd


# ----------------------------------------------------------------------------- ratios of sums

def ratio_bootstrap(num, den, n_boot=1000, seed=0):
    """[n_boot] resampled sum(num) / sum(den), items (num[i], den[i]) drawn together with replacement: e.g. a
    token-weighted mean NLL over sentences, where long sentences count for more."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
    return num[idx].sum(1) / den[idx].sum(1)


def paired_ratio_bootstrap(first, second, n_boot=1000, seed=0, level=0.95):
    """Paired bootstrap of ratio(second) - ratio(first), ratio = sum(num) / sum(den), on the same items (first,
    second: (num, den) pairs of equal-length arrays; items resampled jointly for both). Returns {"diff", "ci",
    "p"} with p as in paired_bootstrap."""
    (num1, den1), (num2, den2) = [(np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64))
                                  for n, d in (first, second)]
    if len(num1) != len(num2):
        raise ValueError(f"a paired ratio comparison needs the same items, got {len(num1)} and {len(num2)}")
    idx = np.random.default_rng(seed).integers(0, len(num1), size=(n_boot, len(num1)))
    boot = num2[idx].sum(1) / den2[idx].sum(1) - num1[idx].sum(1) / den1[idx].sum(1)
    diff = float(num2.sum() / den2.sum() - num1.sum() / den1.sum())
    return {"diff": diff, "ci": percentile_interval(boot, level), "p": _two_sided_p(boot, diff)}


# ----------------------------------------------------------------------------- agreement and printing

def cohen_kappa(a, b):
    """Cohen's kappa of two raters' labels on the same items: (p_o - p_e) / (1 - p_e), p_o the observed
    agreement, p_e the agreement expected from each rater's label shares. nan when p_e = 1 (both raters give
    one and the same label to every item: agreement beyond chance is undefined)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"kappa needs two equal-length non-empty label lists, got {a.shape} and {b.shape}")
    p_o = float(np.mean(a == b))
    p_e = sum(float(np.mean(a == v)) * float(np.mean(b == v)) for v in np.union1d(a, b))
    return float("nan") if p_e >= 1 else (p_o - p_e) / (1 - p_e)


def bootstrap_floor(n_boot):
    """The smallest p paired_bootstrap can return with n_boot draws: 2 / (n_boot + 1) (0.0002 at 10000)."""
    return 2 / (n_boot + 1)


def permutation_floor(permutations):
    """The smallest p a random-permutation test with the observed draw counted can return: 1 / (P + 1)."""
    return 1 / (permutations + 1)


def sign_flip_floor(n):
    """The smallest two-sided p an exact sign-flip test on n paired differences can reach: 2 / 2^n (0.5 at n=2).
    A resampling p below it claims more than n pairs can show."""
    return min(1.0, 2 / 2 ** n)


def _round_up(x):
    """x rounded up to one significant digit (0.00019998 -> 0.0002): the bound printed beside a floor."""
    scale = 10 ** math.floor(math.log10(x))
    return math.ceil(x / scale - 1e-9) * scale


def format_p(p, floor=None):
    """A p-value for tables: '< 1e-4', '0.0004', '0.003', '0.021', '0.41'; 'n/a' for nan. With floor (the
    smallest p the test can return, e.g. bootstrap_floor(n_boot)), a p at the floor prints as '< 0.0002':
    the test only says p is at most that, not that it equals it."""
    if p is None or math.isnan(p):
        return "n/a"
    if floor is not None and p <= floor * (1 + 1e-9):
        return f"< {_round_up(floor):.{max(0, -math.floor(math.log10(_round_up(floor))))}f}"
    if p < 1e-4:
        return "< 1e-4"
    if p < 1e-3:
        return f"{p:.4f}"
    if p < 0.1:
        return f"{p:.3f}"
    return f"{p:.2f}"

"""jbnn.stats against a slow loop over the same resamples, coverage, and scipy."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import scipy.stats as st

from jbnn import stats


@functools.partial(jax.jit, static_argnames="n")
def resample_indices(key, r, n):
    """The documented indices of resample r: randint(fold_in(key, r), (n,), 0, n)."""
    return jax.random.randint(jax.random.fold_in(key, r), (n,), 0, n)


def slow_bootstrap(values, key, num_resamples, confidence):
    """The documented resampling, one resample at a time, percentiles by NumPy."""
    values = np.asarray(values, np.float64)
    n = len(values)
    means = []
    for r in range(num_resamples):
        means.append(values[np.asarray(resample_indices(key, r, n))].mean())
    alpha = 1 - confidence
    low, high = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return values.mean(), low, high


def test_bootstrap_ci_matches_a_slow_loop_over_the_same_resamples():
    values = np.random.default_rng(0).exponential(size=25).astype(np.float32)
    key = jax.random.key(3)
    got = stats.bootstrap_ci(values, key_or_seed=key, num_resamples=300, confidence=0.9)
    want = slow_bootstrap(values, key, 300, 0.9)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got.low < got.mean < got.high
    # An int seed is the key of that seed.
    again = stats.bootstrap_ci(values, key_or_seed=3, num_resamples=300, confidence=0.9)
    np.testing.assert_array_equal(again, got)


def test_bootstrap_ci_chunks_large_inputs_the_same_way():
    values = np.random.default_rng(1).normal(size=50_000).astype(np.float32)
    key = jax.random.key(0)
    got = stats.bootstrap_ci(values, key_or_seed=key, num_resamples=120)  # 84 per chunk
    means = [
        values[np.asarray(resample_indices(key, r, 50_000))].astype(np.float64).mean()
        for r in range(120)
    ]
    np.testing.assert_allclose(
        [got.low, got.high], np.percentile(means, [2.5, 97.5]), rtol=1e-4, atol=1e-6
    )


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    num_trials, n = 200, 40
    data = rng.normal(loc=1.5, scale=2.0, size=(num_trials, n)).astype(np.float32)
    hits = 0
    for t in range(num_trials):
        ci = stats.bootstrap_ci(data[t], key_or_seed=t, num_resamples=1000)
        hits += bool(ci.low <= 1.5 <= ci.high)
    # Percentile bootstrap with n = 40 covers about 93-94%; +-3 standard errors of 200
    # trials around that.
    assert 0.87 <= hits / num_trials <= 0.99, hits / num_trials
    # And its width is close to the normal-theory interval's.
    intervals = [stats.bootstrap_ci(d, key_or_seed=0, num_resamples=2000) for d in data[:5]]
    widths = [float(ci.high - ci.low) for ci in intervals]
    normal = [2 * 1.96 * d.std(ddof=1) / np.sqrt(n) for d in data[:5]]
    np.testing.assert_allclose(widths, normal, rtol=0.15)


def test_paired_difference_is_the_bootstrap_of_the_differences():
    rng = np.random.default_rng(3)
    a = rng.normal(size=30).astype(np.float32)
    b = (a - 0.5 + 0.1 * rng.normal(size=30)).astype(np.float32)
    got = stats.paired_difference(a, b, key_or_seed=5, num_resamples=500)
    want = stats.bootstrap_ci(a - b, key_or_seed=5, num_resamples=500)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert 0.4 < got.low < 0.5 < got.high < 0.6


def test_paired_difference_keeps_small_differences_of_large_scores():
    """Differences are taken before the float32 cast: 1e8 + 1 and 1e8 were both 1e8."""
    b = np.full(4, 1e8)
    a = b + np.array([1.0, 2.0, 3.0, 4.0])
    got = stats.paired_difference(a, b, key_or_seed=0, num_resamples=200)
    want = stats.bootstrap_ci(a - b, key_or_seed=0, num_resamples=200)
    np.testing.assert_array_equal(got, want)
    assert float(got.mean) == 2.5 and 1.0 <= got.low < got.high <= 4.0


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_wilcoxon_matches_scipy(alternative):
    rng = np.random.default_rng(4)
    for n in (8, 60):  # exact and normal-approximation regimes
        a = rng.normal(size=n)
        b = a - 0.3 + rng.normal(size=n)
        b[:2] = a[:2]  # zero differences are dropped
        got = stats.wilcoxon(a, b, alternative=alternative)
        want = st.wilcoxon(a, b, alternative=alternative)
        assert got.statistic == pytest.approx(float(want.statistic))
        assert got.p_value == pytest.approx(float(want.pvalue))


def test_wilcoxon_against_its_definition():
    """Independent of scipy: the exact null by enumerating the 2^n sign patterns (n = 10),
    and the normal approximation with the tie correction (n = 80, ties and zeros)."""
    import itertools

    rng = np.random.default_rng(7)
    a = rng.normal(size=10)
    b = a + rng.normal(0.5, 1.0, size=10)
    d = a - b
    ranks = st.rankdata(np.abs(d))
    t_plus = ranks[d > 0].sum()
    t = min(t_plus, ranks.sum() - t_plus)
    null = [ranks[np.array(s, bool)].sum() for s in itertools.product([0, 1], repeat=10)]
    got = stats.wilcoxon(a, b)
    assert got.statistic == t
    assert got.p_value == pytest.approx(min(1.0, 2 * np.mean(np.array(null) <= t)), rel=1e-12)

    a = np.round(rng.normal(size=80), 1)
    b = np.round(a + rng.normal(0.2, 1.0, size=80), 1)
    b[:3] = a[:3]  # zero differences: dropped
    d = (a - b)[a != b]
    n = len(d)
    ranks = st.rankdata(np.abs(d))
    _, ties = np.unique(np.abs(d), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - (ties**3 - ties).sum() / 48
    z = (ranks[d > 0].sum() - n * (n + 1) / 4) / np.sqrt(var)
    assert stats.wilcoxon(a, b).p_value == pytest.approx(2 * st.norm.sf(abs(z)), rel=1e-9)


def test_wilcoxon_all_zero_differences_is_documented_no_difference():
    a = np.arange(5.0)
    assert stats.wilcoxon(a, a) == (0.0, 1.0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        stats.bootstrap_ci(np.array([1.0, np.nan]), key_or_seed=0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        stats.bootstrap_ci(np.zeros((2, 3)), key_or_seed=0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        stats.bootstrap_ci(np.zeros(0), key_or_seed=0)
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_ci(np.ones(3), key_or_seed=0, confidence=95)
    with pytest.raises(ValueError, match="num_resamples"):
        stats.bootstrap_ci(np.ones(3), key_or_seed=0, num_resamples=0)
    with pytest.raises(TypeError, match="key_or_seed"):
        stats.bootstrap_ci(np.ones(3), key_or_seed="seed")
    with pytest.raises(ValueError, match="pair up"):
        stats.paired_difference(np.ones(3), np.ones(4), key_or_seed=0)
    with pytest.raises(ValueError, match="pair up"):
        stats.wilcoxon(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        stats.wilcoxon(np.array([1.0, np.nan]), np.ones(2))
    with pytest.raises(ValueError, match="alternative"):
        stats.wilcoxon(np.ones(3), np.zeros(3), alternative="bigger")


def test_values_beyond_float32_are_refused_not_turned_into_inf():
    """The resampling runs in float32: 1e39 would become inf and give an infinite mean."""
    for values in (np.array([1e39, 1.0]), [1.0, -1e39]):
        with pytest.raises(ValueError, match="beyond the float32 range"):
            stats.bootstrap_ci(values, key_or_seed=0, num_resamples=100)
        with pytest.raises(ValueError, match="beyond the float32 range"):
            stats.paired_difference(values, np.ones(2), key_or_seed=0, num_resamples=100)
    # The Wilcoxon test computes in float64 and still takes them, as scipy does.
    a, b = np.array([1e39, 1.0, 3.0]), np.array([1.0, 2.0, 1.0])
    want = st.wilcoxon(a, b)
    assert stats.wilcoxon(a, b) == (float(want.statistic), float(want.pvalue))

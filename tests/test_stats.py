"""The report's statistics against scipy and published values on fixed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from eval.stats import (
    benjamini_hochberg,
    binomial_se,
    bootstrap_mde,
    clip_interval,
    holm,
    one_image_step,
    paired_bootstrap,
    paired_bootstrap_diffs,
    paired_t_mde,
    seeds_needed,
    t_mde,
    t_power,
    two_sample_comparison,
)

# The 20 raw p-values of the digits default grid's method-vs-base table (results/table.md before
# this report existed): 4 below 0.05, none after Holm (the smallest adjusted is 20 × 0.00587).
DIGITS_P = [0.0742, 0.383, 0.423, 0.423, 0.667, 0.478, 0.0187, 0.00600, 1.00, 0.00587, 0.903,
            0.499, 0.912, 0.344, 0.448, 0.0261, 0.0585, 0.0599, 0.238, 0.667]


def _holm_by_hand(p):
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def test_holm_on_the_digits_table():
    adjusted = holm(DIGITS_P)
    assert adjusted.min() == pytest.approx(20 * 0.00587)
    assert round(float(adjusted.min()), 3) == 0.117
    assert int((np.asarray(DIGITS_P) < 0.05).sum()) == 4 and int((adjusted < 0.05).sum()) == 0
    np.testing.assert_allclose(adjusted, _holm_by_hand(DIGITS_P), rtol=0, atol=1e-15)
    assert np.all(adjusted >= np.asarray(DIGITS_P))


def test_holm_fixed_numbers_and_nan():
    # sorted 0.005, 0.01, 0.03, 0.04 → ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 → running max
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    out = holm([0.01, math.nan, 0.02])  # NaN (no p-value) is not part of the family: m = 2
    assert math.isnan(out[1])
    np.testing.assert_allclose(out[[0, 2]], [0.02, 0.02])
    assert holm([]).size == 0
    with pytest.raises(ValueError, match="p-values must lie in"):
        holm([0.5, 1.5])


def test_benjamini_hochberg_matches_scipy():
    q = benjamini_hochberg(DIGITS_P)
    np.testing.assert_allclose(q, stats.false_discovery_control(DIGITS_P, method="bh"))
    # by hand: sorted 0.005, 0.01, 0.03, 0.04 → 4·p/rank = 0.02, 0.02, 0.04, 0.04
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.04, 0.03, 0.005]),
                               [0.02, 0.04, 0.04, 0.02])
    out = benjamini_hochberg([0.01, math.nan, 0.04])
    assert math.isnan(out[1]) and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.04)


def _nct_power(delta, sd, n, alpha=0.05):
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = delta / (sd / math.sqrt(n))
    # the lower tail P(T < −crit | nc) written as P(T > crit | −nc)
    return stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc)


def test_t_power_matches_scipy_nct_and_gpower():
    # G*Power, one-sample/paired t, two-sided α = 0.05: d = 1, n = 10 → 0.8031; d = 0.5, n = 34
    # → 0.8078.
    assert t_power(1.0, 1 / math.sqrt(10), 9) == pytest.approx(0.8031, abs=5e-5)
    assert t_power(0.5, 1 / math.sqrt(34), 33) == pytest.approx(0.8078, abs=5e-5)
    for delta, sd, n in ((0.4, 0.3, 3), (1.0, 2.0, 5), (2.0, 1.0, 2)):
        assert t_power(delta, sd / math.sqrt(n), n - 1) == pytest.approx(
            _nct_power(delta, sd, n), rel=1e-9)
    assert t_power(0.0, 1.0, 4) == pytest.approx(0.05)  # no effect: the test's level
    assert math.isnan(t_power(1.0, math.nan, 4)) and math.isnan(t_power(1.0, 1.0, 0))


def test_paired_mde_gives_the_target_power():
    for sd, n in ((1.0, 10), (0.6, 3), (2.5, 2), (1.3, 20)):
        mde = paired_t_mde(sd, n)
        assert _nct_power(mde, sd, n) == pytest.approx(0.8, abs=1e-8)
    # d = 1 at n = 10 has power 0.8031 > 0.8, so the MDE is just below one SD
    assert paired_t_mde(1.0, 10) == pytest.approx(0.996, abs=1e-3)
    assert paired_t_mde(0.0, 3) == 0.0
    assert math.isnan(paired_t_mde(1.0, 1))
    assert t_mde(0.5, 3) == pytest.approx(paired_t_mde(1.0, 4))  # se = sd / √n, df = n − 1


def test_paired_mde_by_simulation():
    """At the MDE, scipy's own paired t-test rejects in 80% of simulated experiments."""
    sd, n = 1.0, 5
    mde = paired_t_mde(sd, n)
    rng = np.random.default_rng(0)
    diffs = rng.normal(mde, sd, size=(40000, n))
    rejected = stats.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05
    assert rejected.mean() == pytest.approx(0.8, abs=0.01)


def test_seeds_needed():
    assert seeds_needed(1.0, 1.0) == 10  # n = 9 gives 0.748, n = 10 gives 0.803
    assert _nct_power(1.0, 1.0, 9) < 0.8 <= _nct_power(1.0, 1.0, 10)
    assert seeds_needed(0.5, 1.0) is None  # 34 seeds: "more than 20"
    assert seeds_needed(0.5, 1.0, max_seeds=40) == 34
    assert seeds_needed(-1.0, 1.0) == 10  # the sign does not matter
    assert seeds_needed(0.0, 1.0) is None and seeds_needed(math.nan, 1.0) is None
    assert seeds_needed(0.3, 0.0) == 2  # no spread: two seeds settle it


def test_seeds_needed_two_arms_uses_welch():
    sd1, sd2, delta = 1.0, 2.0, 2.0
    n = seeds_needed(delta, sd1, sd_other=sd2)

    def power(k):
        se = math.sqrt((sd1**2 + sd2**2) / k)
        df = (k - 1) * (sd1**2 + sd2**2) ** 2 / (sd1**4 + sd2**4)
        crit = stats.t.ppf(0.975, df)
        return stats.nct.sf(crit, df, delta / se) + stats.nct.sf(crit, df, -delta / se)

    assert power(n - 1) < 0.8 <= power(n)


def test_bootstrap_mde_from_the_paired_bootstrap():
    rng = np.random.default_rng(3)
    a = rng.random(300) < 0.8
    b = rng.random(300) < 0.75
    observed, diffs = paired_bootstrap_diffs(a, b)
    assert observed == pytest.approx(100 * (a.mean() - b.mean()))
    assert paired_bootstrap(a, b) == pytest.approx(
        (observed, *np.percentile(diffs, [2.5, 97.5])))
    mde, se = bootstrap_mde(diffs)
    assert se == pytest.approx(np.std(diffs, ddof=1))
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert z == pytest.approx(2.8016, abs=1e-4) and mde == pytest.approx(z * se)


def test_noise_floor():
    assert one_image_step(360) == pytest.approx(0.2778, abs=1e-4)
    assert one_image_step(10_000) == pytest.approx(0.01)
    # digits at 97%: about 0.9 points; Fashion-MNIST at 85%: 0.36 points
    assert binomial_se(97.0, 360) == pytest.approx(100 * math.sqrt(0.97 * 0.03 / 360))
    assert binomial_se(97.0, 360) == pytest.approx(0.899, abs=1e-3)
    assert binomial_se(85.0, 10_000) == pytest.approx(0.357, abs=1e-3)
    assert binomial_se(100.0, 40) == 0.0
    with pytest.raises(ValueError, match="n_test must be >= 1"):
        one_image_step(0)
    with pytest.raises(ValueError, match="accuracy must lie in"):
        binomial_se(101.0, 10)


def test_clip_interval():
    assert clip_interval(93.12, 100.96) == (93.12, 100.0, True)
    assert clip_interval(-2.0, 4.0) == (0.0, 4.0, True)
    assert clip_interval(10.0, 20.0) == (10.0, 20.0, False)
    low, high, clipped = clip_interval(math.nan, math.nan)
    assert math.isnan(low) and math.isnan(high) and not clipped


def test_two_sample_comparison_matches_scipy():
    m, r = [84.0, 85.5, 86.0], [80.0, 81.0, 83.5, 82.0]
    result = two_sample_comparison(m, r)
    welch = stats.ttest_ind(m, r, equal_var=False)
    assert result.test == "Welch t" and result.p_value == pytest.approx(welch.pvalue)
    vm, vr = np.var(m, ddof=1) / 3, np.var(r, ddof=1) / 4
    df = (vm + vr) ** 2 / (vm**2 / 2 + vr**2 / 3)
    assert result.df == pytest.approx(df)
    assert result.half_width == pytest.approx(stats.t.ppf(0.975, df) * math.sqrt(vm + vr))
    one = two_sample_comparison(m, [82.0])
    assert one.test == "one-sample t"
    assert one.p_value == pytest.approx(stats.ttest_1samp(m, 82.0).pvalue)
    assert one.mean_diff == pytest.approx(np.mean(m) - 82.0)
    with pytest.raises(ValueError, match=">= 2 method values"):
        two_sample_comparison([1.0], [2.0])

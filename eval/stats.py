"""Aggregation over seeds and method-vs-base comparisons (docs/protocol.md §5).

* Across seeds (n ≥ 2): m̄ ± t_{0.975, n−1} · s/√n, s with ddof = 1 (:func:`t_interval`).
* Single seed: percentile bootstrap over test images, 1000 resamples, generator seed 0
  (:func:`bootstrap_ci`). It reflects test-set sampling only, not training variance.
* Method vs base over matched seeds S: d_s = m_method,s − m_base,s, mean d̄, its t-CI and the
  two-sided ``scipy.stats.ttest_rel`` p-value (:func:`paired_comparison`); with |S| = 1 a paired
  bootstrap over test images (:func:`paired_bootstrap`); with |S| = 0 "no matched seeds".
* Rounding: accuracies to 2 decimals (:func:`fmt_acc`), p-values to 3 significant digits
  (:func:`fmt_p`).

For a table of comparisons (one family):

* Holm's step-down adjusted p-values (:func:`holm`) and Benjamini–Hochberg q-values
  (:func:`benjamini_hochberg`, ``scipy.stats.false_discovery_control``) beside the raw p.
* Power of a two-sided t-test from the noncentral t (:func:`t_power`): the minimum detectable
  effect at α = 0.05 and power 0.8 (:func:`t_mde`, :func:`paired_t_mde`) and the number of seeds
  that would detect an observed Δ (:func:`seeds_needed`); with one seed the same from the paired
  bootstrap's standard error over test images (:func:`bootstrap_mde`).
* The noise floor of a test split: one image = 100/N_test points (:func:`one_image_step`) and the
  binomial standard error 100·√(p(1−p)/N_test) (:func:`binomial_se`).
* Intervals clipped to [0, 100] with a flag (:func:`clip_interval`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps

__all__ = [
    "ALPHA",
    "BOOTSTRAP_LABEL",
    "MAX_SEEDS",
    "NO_MATCHED_SEEDS",
    "POWER",
    "PairedResult",
    "SeedSummary",
    "TwoSampleResult",
    "benjamini_hochberg",
    "binomial_se",
    "bootstrap_ci",
    "bootstrap_mde",
    "clip_interval",
    "fmt_acc",
    "fmt_p",
    "holm",
    "one_image_step",
    "paired_bootstrap",
    "paired_bootstrap_diffs",
    "paired_comparison",
    "paired_t_mde",
    "seeds_needed",
    "t_interval",
    "t_mde",
    "t_power",
    "two_sample_comparison",
]

NO_MATCHED_SEEDS = "no matched seeds"
BOOTSTRAP_LABEL = "bootstrap over test images, n = 1"
# Power analysis: two-sided level and target power; seed counts are searched up to MAX_SEEDS.
ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 20


@dataclass
class SeedSummary:
    """Mean, sample std (ddof = 1), n and the t half-width t_{(1+conf)/2, n−1} · s/√n."""

    mean: float
    std: float
    n: int
    half_width: float
    confidence: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


@dataclass
class PairedResult:
    """Paired comparison of a method against its base over matched seeds.

    ``diffs`` lists (seed, d_s) with d_s = method − base, sorted by seed. ``mean_diff``,
    ``half_width`` (t-CI of d̄) and ``p_value`` are NaN where undefined: everything when
    n = 0, half-width and p-value when n = 1 (use :func:`paired_bootstrap` then). ``note`` says
    which case applies.
    """

    n: int
    diffs: list[tuple[int, float]]
    mean_diff: float
    std_diff: float
    half_width: float
    p_value: float
    unmatched_method: list[int] = field(default_factory=list)
    unmatched_base: list[int] = field(default_factory=list)
    note: str = ""
    confidence: float = 0.95

    @property
    def low(self) -> float:
        return self.mean_diff - self.half_width

    @property
    def high(self) -> float:
        return self.mean_diff + self.half_width


def _t_half_width(std: float, n: int, confidence: float) -> float:
    if n < 2:
        return math.nan
    return float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> SeedSummary:
    """Mean ± t_{(1+conf)/2, n−1} · s/√n over seeds, s = sample std (ddof = 1).

    n = 1 gives std = half_width = NaN (no spread can be estimated from one seed).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n >= 2 else math.nan
    return SeedSummary(mean, std, n, _t_half_width(std, n, confidence), confidence)


def _resample_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    # Memory: 8 · n_resamples · n bytes (80 MB for 10k test images); kept as one draw so the
    # index sets are exactly those of the documented call.
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def _as_correct(correct: object) -> np.ndarray:
    if hasattr(correct, "detach"):
        correct = correct.detach().cpu().numpy()
    c = np.asarray(correct).ravel()
    if c.size == 0:
        raise ValueError("the correctness vector is empty")
    return c.astype(np.float64)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 100.0 * (1 - confidence) / 2
    low, high = np.percentile(values, [alpha, 100.0 - alpha])
    return float(low), float(high)


def bootstrap_ci(
    correct: Sequence[bool] | np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Accuracy and its percentile-bootstrap CI over test images, all in percent.

    acc = 100 · mean(c); resample b uses indices I_b from
    ``default_rng(seed).integers(0, N, size=(n_resamples, N))``; acc_b = 100 · mean(c[I_b]);
    the CI is the (1−conf)/2 and (1+conf)/2 percentiles of {acc_b} (NumPy's linear
    interpolation). Label: "bootstrap over test images, n = 1".
    """
    c = _as_correct(correct)
    idx = _resample_indices(c.size, n_resamples, seed)
    accs = 100.0 * c[idx].mean(axis=1)
    low, high = _percentiles(accs, confidence)
    return 100.0 * float(c.mean()), low, high


def paired_bootstrap_diffs(
    correct_method: Sequence[bool] | np.ndarray,
    correct_base: Sequence[bool] | np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, np.ndarray]:
    """The observed difference method − base and its ``n_resamples`` paired-bootstrap replicates,
    in percentage points: both vectors resampled with the same index sets (see
    :func:`paired_bootstrap`)."""
    cm = _as_correct(correct_method)
    cb = _as_correct(correct_base)
    if cm.shape != cb.shape:
        raise ValueError(
            f"correctness vectors differ in length: {cm.size} (method) vs {cb.size} (base)"
        )
    d = cm - cb
    idx = _resample_indices(d.size, n_resamples, seed)
    return 100.0 * float(d.mean()), 100.0 * d[idx].mean(axis=1)


def paired_bootstrap(
    correct_method: Sequence[bool] | np.ndarray,
    correct_base: Sequence[bool] | np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Accuracy difference method − base (percentage points) with a paired bootstrap CI.

    Both correctness vectors are resampled with the *same* index sets I_b (drawn as in
    :func:`bootstrap_ci`); diff_b = 100 · (mean(c_m[I_b]) − mean(c_b[I_b])); the CI is the
    percentile interval of {diff_b}. No p-value (protocol §5, |S| = 1).
    """
    observed, diffs = paired_bootstrap_diffs(correct_method, correct_base, n_resamples, seed)
    low, high = _percentiles(diffs, confidence)
    return observed, low, high


def paired_comparison(
    method: Mapping[int, float],
    base: Mapping[int, float],
    confidence: float = 0.95,
) -> PairedResult:
    """Paired t comparison over the seeds S run for both method and base.

    d_s = method[s] − base[s] for s ∈ S; d̄ = mean(d_s); CI = d̄ ± t_{(1+conf)/2, n−1} · s_d/√n;
    p = two-sided ``scipy.stats.ttest_rel(method[S], base[S])`` for n ≥ 2, passed through as
    SciPy returns it: identical non-zero d_s give t = ±inf and p = 0, all-zero d_s give NaN.
    Unmatched seeds of either side are listed, never dropped.
    """
    matched = sorted(set(method) & set(base))
    unmatched_method = sorted(set(method) - set(base))
    unmatched_base = sorted(set(base) - set(method))
    n = len(matched)
    if n == 0:
        return PairedResult(
            n=0,
            diffs=[],
            mean_diff=math.nan,
            std_diff=math.nan,
            half_width=math.nan,
            p_value=math.nan,
            unmatched_method=unmatched_method,
            unmatched_base=unmatched_base,
            note=NO_MATCHED_SEEDS,
            confidence=confidence,
        )
    m = np.array([method[s] for s in matched], dtype=np.float64)
    b = np.array([base[s] for s in matched], dtype=np.float64)
    d = m - b
    std = float(d.std(ddof=1)) if n >= 2 else math.nan
    if n >= 2:
        with warnings.catch_warnings():
            # Zero-variance differences trigger a precision warning; the value is reported.
            warnings.simplefilter("ignore", RuntimeWarning)
            p_value = float(sps.ttest_rel(m, b).pvalue)
        note = f"paired t-test over {n} matched seeds"
    else:
        p_value = math.nan
        note = "single matched seed: use paired_bootstrap on per-image correctness"
    return PairedResult(
        n=n,
        diffs=[(int(s), float(v)) for s, v in zip(matched, d, strict=True)],
        mean_diff=float(d.mean()),
        std_diff=std,
        half_width=_t_half_width(std, n, confidence),
        p_value=p_value,
        unmatched_method=unmatched_method,
        unmatched_base=unmatched_base,
        note=note,
        confidence=confidence,
    )


@dataclass
class TwoSampleResult:
    """Method vs a reference without matched seeds: Δ = mean(method) − mean(reference).

    ``test`` is "one-sample t" when the reference has one value (taken as fixed:
    ``scipy.stats.ttest_1samp``) or "Welch t" when both sides have two or more
    (``scipy.stats.ttest_ind(equal_var=False)``); ``se`` and ``df`` are those of the test's
    statistic, ``sd_method`` / ``sd_reference`` the sample SDs (NaN for one value).
    """

    mean_diff: float
    se: float
    df: float
    p_value: float
    half_width: float
    test: str
    n_method: int
    n_reference: int
    sd_method: float
    sd_reference: float

    @property
    def low(self) -> float:
        return self.mean_diff - self.half_width

    @property
    def high(self) -> float:
        return self.mean_diff + self.half_width


def two_sample_comparison(
    method: Sequence[float], reference: Sequence[float], confidence: float = 0.95
) -> TwoSampleResult:
    """Unpaired comparison of a method's seeds with a reference's (needs ≥ 2 method values).

    One reference value: the one-sample t-test of the method values against it, se = s_m/√n_m,
    df = n_m − 1. Several: Welch's t-test, se = √(s_m²/n_m + s_r²/n_r) with the
    Welch–Satterthwaite df. CI = Δ ± t_{(1+conf)/2, df} · se.
    """
    m = np.asarray(method, dtype=np.float64).ravel()
    r = np.asarray(reference, dtype=np.float64).ravel()
    if m.size < 2 or r.size < 1:
        raise ValueError(
            f"two_sample_comparison needs >= 2 method values and >= 1 reference value, got "
            f"{m.size} and {r.size}"
        )
    sd_m = float(m.std(ddof=1))
    sd_r = float(r.std(ddof=1)) if r.size >= 2 else math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if r.size == 1:
            se = sd_m / math.sqrt(m.size)
            df = float(m.size - 1)
            p_value = float(sps.ttest_1samp(m, float(r[0])).pvalue)
            test = "one-sample t"
        else:
            vm, vr = sd_m**2 / m.size, sd_r**2 / r.size
            se = math.sqrt(vm + vr)
            denominator = vm**2 / (m.size - 1) + vr**2 / (r.size - 1)
            df = (vm + vr) ** 2 / denominator if denominator > 0 else float(m.size + r.size - 2)
            p_value = float(sps.ttest_ind(m, r, equal_var=False).pvalue)
            test = "Welch t"
    half = float(sps.t.ppf(0.5 + confidence / 2, df)) * se
    return TwoSampleResult(
        mean_diff=float(m.mean() - r.mean()), se=se, df=df, p_value=p_value, half_width=half,
        test=test, n_method=int(m.size), n_reference=int(r.size), sd_method=sd_m,
        sd_reference=sd_r,
    )


# --------------------------------------------------------------------------------------------
# multiple comparisons
# --------------------------------------------------------------------------------------------
def _finite(p_values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p_values, dtype=np.float64).ravel()
    if np.any((p[np.isfinite(p)] < 0) | (p[np.isfinite(p)] > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    return p, np.isfinite(p)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values over the family of the finite entries.

    With the m finite p-values sorted, p_(1) ≤ … ≤ p_(m):
    p̃_(i) = min(1, max_{j ≤ i} (m − j + 1) · p_(j)). NaN entries (comparisons without a p-value)
    stay NaN and are not counted in m. Rejecting p̃ < α controls the family-wise error rate.
    """
    p, ok = _finite(p_values)
    out = np.full(p.shape, math.nan)
    m = int(ok.sum())
    if m == 0:
        return out
    finite = p[ok]
    order = np.argsort(finite, kind="stable")
    scaled = (m - np.arange(m)) * finite[order]
    adjusted = np.minimum(1.0, np.maximum.accumulate(scaled))
    result = np.empty(m)
    result[order] = adjusted
    out[ok] = result
    return out


def benjamini_hochberg(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg q-values (``scipy.stats.false_discovery_control(method="bh")``) over the
    finite entries; q_(i) = min_{j ≥ i} min(1, m · p_(j) / j). NaN entries stay NaN. Rejecting
    q < α controls the false discovery rate (for independent or positively dependent tests)."""
    p, ok = _finite(p_values)
    out = np.full(p.shape, math.nan)
    if ok.any():
        out[ok] = sps.false_discovery_control(p[ok], method="bh")
    return out


# --------------------------------------------------------------------------------------------
# power
# --------------------------------------------------------------------------------------------
def t_power(delta: float, se: float, df: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided t-test at level α to detect a true difference ``delta``.

    T = Δ̂/se follows a noncentral t with df degrees of freedom and noncentrality δ/se; the power
    is P(T > t_{1−α/2, df}) + P(T < −t_{1−α/2, df}) (``scipy.stats.nct``). NaN for se = NaN
    or df < 1; se = 0 gives 1 for δ ≠ 0.
    """
    if not (df >= 1) or math.isnan(se) or math.isnan(delta):
        return math.nan
    critical = float(sps.t.ppf(1 - alpha / 2, df))
    if se == 0:
        return 1.0 if delta != 0 else alpha
    nc = abs(delta) / se
    upper = float(sps.nct.sf(critical, df, nc))
    # P(T < −c | nc) = P(T > c | −nc): nct.cdf far in the lower tail can return NaN, sf cannot.
    lower = float(sps.nct.sf(critical, df, -nc))
    return upper + (0.0 if math.isnan(lower) else lower)


def t_mde(se: float, df: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable effect: the δ ≥ 0 at which :func:`t_power` equals ``power``.

    Solved by root finding (``scipy.optimize.brentq``) on δ/se. 0 for se = 0; NaN where the power
    is undefined (se NaN, df < 1).
    """
    if not (df >= 1) or math.isnan(se):
        return math.nan
    if se == 0:
        return 0.0
    if not alpha < power < 1:
        raise ValueError(f"power must lie in (alpha, 1) = ({alpha}, 1), got {power}")
    from scipy.optimize import brentq

    def gap(nc: float) -> float:
        return t_power(nc, 1.0, df, alpha) - power

    high = 1.0
    while gap(high) < 0:
        high *= 2.0
    return float(brentq(gap, 0.0, high, xtol=1e-10, rtol=1e-12)) * se


def paired_t_mde(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """MDE of the paired t-test over n matched seeds with per-seed differences of SD ``sd``:
    :func:`t_mde` with se = sd/√n and df = n − 1 (NaN for n < 2)."""
    if n < 2:
        return math.nan
    return t_mde(sd / math.sqrt(n), n - 1, alpha, power)


def seeds_needed(
    delta: float,
    sd: float,
    alpha: float = ALPHA,
    power: float = POWER,
    max_seeds: int = MAX_SEEDS,
    sd_other: float | None = None,
) -> int | None:
    """The smallest number of seeds n ≤ ``max_seeds`` at which a two-sided t-test at level α
    detects a true difference ``delta`` with the given power; None if more than ``max_seeds``
    (or delta is 0 or NaN).

    Paired (``sd_other`` None): se = sd/√n, df = n − 1. Two independent arms of n seeds each
    with SDs ``sd`` and ``sd_other``: se = √((sd² + sd_other²)/n) and the Welch df
    (n − 1)(sd² + sd_other²)² / (sd⁴ + sd_other⁴).
    """
    if math.isnan(delta) or delta == 0 or math.isnan(sd):
        return None
    for n in range(2, max_seeds + 1):
        if sd_other is None:
            se, df = sd / math.sqrt(n), n - 1.0
        else:
            total = sd**2 + sd_other**2
            se = math.sqrt(total / n)
            fourth = sd**4 + sd_other**4
            df = (n - 1.0) * total**2 / fourth if fourth > 0 else 2.0 * (n - 1)
        if t_power(delta, se, df, alpha) >= power:
            return n
    return None


def bootstrap_mde(diffs: np.ndarray, alpha: float = ALPHA, power: float = POWER) -> tuple[float, float]:
    """(MDE, SE) from paired-bootstrap replicates of a one-seed difference (test-set sampling only).

    SE = sample SD of the replicates (ddof = 1); MDE = (z_{1−α/2} + z_{power}) · SE, the normal
    approximation of the bootstrap distribution (2.80 · SE at α = 0.05, power 0.8).
    """
    d = np.asarray(diffs, dtype=np.float64).ravel()
    if d.size < 2:
        return math.nan, math.nan
    se = float(d.std(ddof=1))
    return float(sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(power)) * se, se


# --------------------------------------------------------------------------------------------
# noise floor and bounds
# --------------------------------------------------------------------------------------------
def one_image_step(n_test: int) -> float:
    """Percentage points one test image is worth: 100 / N_test."""
    if n_test < 1:
        raise ValueError(f"n_test must be >= 1, got {n_test}")
    return 100.0 / n_test


def binomial_se(accuracy: float, n_test: int) -> float:
    """Binomial standard error of an accuracy (percent) on N_test images:
    100 · √(p(1 − p)/N_test) with p = accuracy/100."""
    if n_test < 1:
        raise ValueError(f"n_test must be >= 1, got {n_test}")
    p = accuracy / 100.0
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"accuracy must lie in [0, 100], got {accuracy}")
    return 100.0 * math.sqrt(p * (1.0 - p) / n_test)


def clip_interval(
    low: float, high: float, lower: float = 0.0, upper: float = 100.0
) -> tuple[float, float, bool]:
    """(low, high) clipped to [lower, upper] and whether anything was clipped. An accuracy lies in
    [0, 100]; a symmetric t-interval near either end can leave it and must say so."""
    clipped = bool(low < lower or high > upper)  # False for NaN bounds
    new_low = low if math.isnan(low) else max(low, lower)
    new_high = high if math.isnan(high) else min(high, upper)
    return new_low, new_high, clipped


def fmt_acc(x: float) -> str:
    """Accuracy in percent with 2 decimals: 12.3456 → "12.35"."""
    return f"{x:.2f}"


def fmt_p(p: float) -> str:
    """p-value to 3 significant digits, trailing zeros kept: 0.5 → "0.500", 1.234e-5 → "1.23e-05"."""
    if math.isnan(p):
        return "nan"
    return f"{p:#.3g}"

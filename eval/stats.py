"""Aggregation over seeds and method-vs-base comparisons (protocol.md §5).

* Across seeds (n ≥ 2): m̄ ± t_{0.975, n−1} · s/√n, s with ddof = 1 (:func:`t_interval`).
* Single seed: percentile bootstrap over test images, 1000 resamples, generator seed 0
  (:func:`bootstrap_ci`). It reflects test-set sampling only, not training variance.
* Method vs base over matched seeds S: d_s = m_method,s − m_base,s, mean d̄, its t-CI and the
  two-sided ``scipy.stats.ttest_rel`` p-value (:func:`paired_comparison`); with |S| = 1 a paired
  bootstrap over test images (:func:`paired_bootstrap`); with |S| = 0 "no matched seeds".
* Rounding: accuracies to 2 decimals (:func:`fmt_acc`), p-values to 3 significant digits
  (:func:`fmt_p`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps

__all__ = [
    "BOOTSTRAP_LABEL",
    "NO_MATCHED_SEEDS",
    "PairedResult",
    "SeedSummary",
    "bootstrap_ci",
    "fmt_acc",
    "fmt_p",
    "paired_bootstrap",
    "paired_comparison",
    "t_interval",
]

NO_MATCHED_SEEDS = "no matched seeds"
BOOTSTRAP_LABEL = "bootstrap over test images, n = 1"


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
    cm = _as_correct(correct_method)
    cb = _as_correct(correct_base)
    if cm.shape != cb.shape:
        raise ValueError(
            f"correctness vectors differ in length: {cm.size} (method) vs {cb.size} (base)"
        )
    d = cm - cb
    idx = _resample_indices(d.size, n_resamples, seed)
    diffs = 100.0 * d[idx].mean(axis=1)
    low, high = _percentiles(diffs, confidence)
    return 100.0 * float(d.mean()), low, high


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


def fmt_acc(x: float) -> str:
    """Accuracy in percent with 2 decimals: 12.3456 → "12.35"."""
    return f"{x:.2f}"


def fmt_p(p: float) -> str:
    """p-value to 3 significant digits, trailing zeros kept: 0.5 → "0.500", 1.234e-5 → "1.23e-05"."""
    if math.isnan(p):
        return "nan"
    return f"{p:#.3g}"

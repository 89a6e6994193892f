"""The advisor's statistics: estimates with standard errors, so a signal fires only when its interval
clears its threshold (docs/advisor.md). Pure Python: no numpy, no torch.

Every estimate is an :class:`Estimate` (value, standard error). Intervals are one-sided at 95%
(``Z`` standard errors): a signal that fires "above" a threshold needs ``value - Z * se`` above it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

Z = 1.645  # one-sided 95%: a signal is wrongly called at most 5% of the time at its threshold
OUTLIER_MADS = 3.5  # a residual this many robust standard deviations out is an outlier batch


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float  # standard error; 0 for an exact number

    @property
    def low(self) -> float:
        return self.value - Z * self.se

    @property
    def high(self) -> float:
        return self.value + Z * self.se

    def interval_text(self, fmt: Callable[[float], str]) -> str:
        return f"{fmt(self.value)} [{fmt(self.low)}, {fmt(self.high)}]"


def t_factor(dof: int) -> float:
    """Student's t 95% one-sided quantile over Z (Cornish-Fisher expansion): a standard error from
    few points is widened by this, so `Z * se` is the t interval."""
    if dof < 1:
        return math.inf
    if dof < 3:
        return {1: 6.314, 2: 2.920}[dof] / Z
    z = Z
    return (z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)) / z


def finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def mean_estimate(values: Sequence[float]) -> Estimate | None:
    """The mean with its standard error (sd / sqrt(n)); None without values."""
    if not values:
        return None
    if len(values) == 1:
        return Estimate(values[0], math.inf)
    return Estimate(statistics.fmean(values),
                    t_factor(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def trimmed_mean(values: Sequence[float], trim: float = 0.2) -> Estimate | None:
    """The 20%-trimmed mean with its Tukey-McLaughlin standard error (from the winsorised variance):
    a batch far off the others moves it little, unlike the plain mean. None without values."""
    if not values:
        return None
    ordered = sorted(values)
    n, g = len(ordered), int(trim * len(ordered))
    if n < 3 or g == 0:
        return mean_estimate(values)
    kept = ordered[g:n - g]
    winsorised = [ordered[g]] * g + kept + [ordered[n - g - 1]] * g
    se = statistics.stdev(winsorised) / ((1 - 2 * g / n) * math.sqrt(n))
    return Estimate(statistics.fmean(kept), t_factor(n - 2 * g - 1) * se)


def _ols(xs: list[float], ys: list[float]) -> tuple[float, float, list[float], float] | None:
    """(slope, intercept, residuals, sum of squares of x) or None when x does not vary."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    intercept = mean_y - slope * mean_x
    return slope, intercept, [y - intercept - slope * x for x, y in zip(xs, ys)], sxx


def robust_slope(xs: Sequence[float], ys: Sequence[float], min_points: int = 4) -> Estimate | None:
    """Least-squares slope of ys on xs with its standard error, after dropping outlier points.

    An outlier is a residual more than OUTLIER_MADS robust standard deviations (1.4826 * median
    absolute residual) from the first fit: one wild batch does not bend the slope. The error uses
    the larger of the residual and the robust standard deviation (heavy tails make the first too
    small by chance) and Student's t for the few points of a window. None with fewer than
    `min_points` usable points.
    """
    points = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if len(points) < min_points:
        return None
    fit = _ols([p[0] for p in points], [p[1] for p in points])
    if fit is None:
        return None
    scale = 1.4826 * statistics.median(abs(r) for r in fit[2])
    if scale > 0:
        kept = [p for p, r in zip(points, fit[2]) if abs(r) <= OUTLIER_MADS * scale]
        if len(kept) >= min_points and len(kept) < len(points):
            points = kept
            fit = _ols([p[0] for p in points], [p[1] for p in points])
            if fit is None:
                return None
    slope, _, residuals, sxx = fit
    dof = len(points) - 2
    if dof < 1:
        return Estimate(slope, math.inf)
    sigma = max(math.sqrt(sum(r * r for r in residuals) / dof), 1.4826 * statistics.median(abs(r) for r in residuals))
    return Estimate(slope, t_factor(dof) * sigma / math.sqrt(sxx))


def wilson(successes: float, trials: float) -> tuple[float, float]:
    """The Wilson score interval (one-sided 95% each side) of a proportion; ties may count half."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + Z * Z / trials
    centre = (p + Z * Z / (2 * trials)) / denominator
    half = Z * math.sqrt(p * (1 - p) / trials + Z * Z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(successes: float, trials: float) -> Estimate | None:
    """A proportion whose low/high are Wilson's bounds (se chosen to match the wider side)."""
    if trials <= 0:
        return None
    p = successes / trials
    low, high = wilson(successes, trials)
    return WilsonEstimate(p, max(p - low, high - p) / Z, low, high)


@dataclass(frozen=True)
class WilsonEstimate(Estimate):
    wilson_low: float = 0.0
    wilson_high: float = 1.0

    @property
    def low(self) -> float:
        return self.wilson_low

    @property
    def high(self) -> float:
        return self.wilson_high


def extra_trials_needed(p: float, threshold: float, trials: float) -> int:
    """About how many more trials at the observed rate `p` make the interval clear `threshold`."""
    gap = abs(p - threshold)
    if gap == 0:
        return 0
    needed = Z * Z * max(p * (1 - p), 0.05) / (gap * gap)
    return max(1, math.ceil(needed - trials))


def jackknife(items: Sequence, statistic: Callable[[Sequence], float | None]) -> Estimate | None:
    """`statistic(items)` with its leave-one-out (jackknife) standard error; None when undefined."""
    value = statistic(items)
    if value is None:
        return None
    n = len(items)
    if n < 3:
        return Estimate(value, math.inf)
    leave_one_out = finite([statistic(items[:i] + items[i + 1:]) for i in range(n)])
    if len(leave_one_out) < n:
        return Estimate(value, math.inf)
    centre = statistics.fmean(leave_one_out)
    return Estimate(value, math.sqrt((n - 1) / n * sum((v - centre) ** 2 for v in leave_one_out)))


def difference(a: Estimate, b: Estimate) -> Estimate:
    """a - b for independent estimates."""
    return Estimate(a.value - b.value, math.hypot(a.se, b.se))


def ratio(a: Estimate, b: Estimate) -> Estimate | None:
    """a / b by the delta method; None when b is not clearly away from zero."""
    if b.value == 0 or b.low <= 0 < b.high or b.high <= 0 < b.low:
        return None
    value = a.value / b.value
    return Estimate(value, math.hypot(a.se / b.value, value * b.se / b.value))


def gao_fit(kl: Sequence[float], quality: Sequence[float],
            weights: Sequence[float] | None = None) -> tuple[float, float] | None:
    """(a, b) of R(d) = d (a - b log d), d = sqrt(KL), fitted by weighted least squares.

    Gao, Schulman & Hilton 2022 ("Scaling laws for reward model overoptimization") found this form
    for the gold reward of best-of-n policies against KL from the start; quality here is labelled
    quality relative to the start state (0 at d = 0). None without three points at positive KL.
    """
    rows = [(math.sqrt(k), q, w) for k, q, w in zip(kl, quality, weights or [1.0] * len(kl)) if k > 0]
    if len(rows) < 3:
        return None
    # Normal equations of q = a * d + b * (-d log d).
    s11 = sum(w * d * d for d, _, w in rows)
    u = [-d * math.log(d) for d, _, _ in rows]
    s12 = sum(w * d * ui for (d, _, w), ui in zip(rows, u))
    s22 = sum(w * ui * ui for (_, _, w), ui in zip(rows, u))
    t1 = sum(w * d * q for d, q, w in rows)
    t2 = sum(w * ui * q for (_, q, w), ui in zip(rows, u))
    determinant = s11 * s22 - s12 * s12
    if abs(determinant) < 1e-12:
        return None
    return (t1 * s22 - t2 * s12) / determinant, (s11 * t2 - s12 * t1) / determinant


def gao_peak_kl(a: float, b: float) -> float | None:
    """KL at the peak of d (a - b log d): dR/dd = a - b (log d + 1) = 0. None when it has no peak."""
    if b <= 0:
        return None
    log_d = a / b - 1
    return math.exp(2 * log_d) if log_d < 50 else None

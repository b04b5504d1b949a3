"""Small statistics for the study: Student-t intervals and the verdict rules.

No SciPy: the t quantile is found by bisection on the t CDF, which is a regularised
incomplete beta function (continued fraction, Numerical Recipes §6.4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

VERDICTS = ("supported", "refuted", "inconclusive")


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300

    def nz(v: float) -> float:
        return v if abs(v) > tiny else tiny

    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 / nz(1.0 - qab * x / qap)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 / nz(1.0 + aa * d)
            c = nz(1.0 + aa / c)
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom."""
    x = df / (df + t * t)
    tail = 0.5 * betainc(df / 2, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t (bisection; accurate to ~1e-10)."""
    if not 0 < q < 1:
        raise ValueError("q must be in (0, 1)")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


@dataclass
class Interval:
    """Mean and two-sided t-interval of a sample (``lo``/``hi`` are None when n < 2)."""

    mean: float | None
    lo: float | None
    hi: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def display(self, digits: int = 3) -> str:
        if self.mean is None:
            return "n/a"
        if self.lo is None or self.hi is None:
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and t-interval of ``values`` (non-finite values are dropped)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(None, None, None, 0)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, None, None, n)
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    half = t_ppf(0.5 + confidence / 2, n - 1) * math.sqrt(var / n)
    return Interval(mean, mean - half, mean + half, n)


def side(interval: Interval, helpful: str, threshold: float = 0.0) -> str:
    """Where an interval lies against ``threshold``: ``helpful``, ``harmful`` or ``both``.

    ``helpful`` is ``"lower"`` or ``"higher"``: the direction in which the metric improves.
    """
    if interval.lo is None or interval.hi is None:
        return "both"
    below, above = interval.hi < threshold, interval.lo > threshold
    if not (below or above):
        return "both"
    return (
        "helpful"
        if (below and helpful == "lower") or (above and helpful == "higher")
        else ("harmful")
    )


def paired_verdict(diff: Interval, helpful: str, expect: str) -> str:
    """The paired-difference rule.

    ``diff`` is the interval of ``metric(variant) - metric(reference)``. A claim that the
    mechanism *helps* (``expect="helps"``) is supported when the whole interval lies on
    the helpful side of 0, refuted when it lies on the harmful side, else inconclusive; a
    claim that it *hurts* (``expect="hurts"``) the other way round.
    """
    where = side(diff, helpful)
    if where == "both":
        return "inconclusive"
    agrees = (where == "helpful") == (expect == "helps")
    return "supported" if agrees else "refuted"


def threshold_verdict(interval: Interval, supported_above: float, refuted_below: float) -> str:
    """Supported if the interval lies above ``supported_above``, refuted if below
    ``refuted_below``, else inconclusive."""
    if interval.lo is None or interval.hi is None:
        return "inconclusive"
    if interval.lo > supported_above:
        return "supported"
    if interval.hi < refuted_below:
        return "refuted"
    return "inconclusive"


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """A row with several variants: supported if one is supported and none refuted,
    refuted if one is refuted and none supported, else inconclusive."""
    s, r = "supported" in verdicts, "refuted" in verdicts
    if s and not r:
        return "supported"
    if r and not s:
        return "refuted"
    return "inconclusive"

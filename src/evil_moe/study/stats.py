"""Statistics of the study: seed-paired t intervals, the verdict rule, Holm's correction.

A claim says that a mechanism moves a metric in a direction (it *helps* or *hurts*) by at
least a minimum effect ``delta``. With ``c`` the per-pair effect in the claimed direction
(positive = as claimed), two one-sided t-tests on the pairs decide it:

* superiority, H0 ``mean(c) <= 0``: rejecting it shows an effect in the claimed direction;
* equivalence (non-inferiority of the null), H0 ``mean(c) >= delta``: rejecting it shows
  that any effect in the claimed direction is smaller than ``delta`` (including none, or
  the reverse).

The p-values of all planned claims' tests are adjusted together by Holm's step-down
method over the claims (:func:`holm_by_claim`: a claim's two nulls are mutually
exclusive, so each step multiplies by the number of claims still in play). A claim is **refuted** when its adjusted equivalence p-value is below ``alpha``,
**supported** when its adjusted superiority p-value is and it is not refuted, and
**inconclusive** otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

VERDICTS = ("supported", "refuted", "inconclusive")


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


def finite(values: Sequence[float | None]) -> list[float]:
    """The finite values of ``values`` as floats."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def t_interval(values: Sequence[float | None], confidence: float = 0.95) -> Interval:
    """Mean and Student-t interval of ``values`` (missing and non-finite values dropped)."""
    xs = finite(values)
    n = len(xs)
    if n == 0:
        return Interval(None, None, None, 0)
    mean = float(np.mean(xs))
    if n < 2:
        return Interval(mean, None, None, n)
    sem = float(np.std(xs, ddof=1)) / math.sqrt(n)
    if sem == 0.0:
        return Interval(mean, mean, mean, n)
    lo, hi = stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return Interval(mean, float(lo), float(hi), n)


def one_sided_p(values: Sequence[float], null: float, alternative: str) -> float | None:
    """p-value of a one-sample t-test of ``mean > null`` (``greater``) or ``< null``."""
    xs = finite(values)
    if len(xs) < 2:
        return None
    if float(np.std(xs, ddof=1)) == 0.0:  # constant sample: the test is degenerate
        mean = xs[0]
        holds = mean > null if alternative == "greater" else mean < null
        return 0.0 if holds else 1.0
    return float(stats.ttest_1samp(xs, null, alternative=alternative).pvalue)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (``None`` entries skipped)."""
    present = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    present.sort()
    m = len(present)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


@dataclass
class ClaimTest:
    """The two one-sided tests of one claim, before and after Holm's adjustment."""

    #: per-pair effect in the claimed direction (positive = as claimed)
    effect: Interval
    p_superiority: float | None
    p_equivalence: float | None
    p_superiority_adjusted: float | None = None
    p_equivalence_adjusted: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["effect"] = self.effect.to_dict()
        return out


def claim_test(claimed: Sequence[float], delta: float, confidence: float = 0.95) -> ClaimTest:
    """Both tests of a claim from its per-pair effects in the claimed direction."""
    return ClaimTest(
        effect=t_interval(claimed, confidence),
        p_superiority=one_sided_p(claimed, 0.0, "greater"),
        p_equivalence=one_sided_p(claimed, delta, "less"),
    )


def holm_by_claim(pvalues: Sequence[tuple[int, float | None]]) -> list[float | None]:
    """Holm's step-down over claims that each carry two mutually exclusive nulls.

    ``pvalues`` holds ``(claim index, p)``. A claim's superiority and equivalence nulls
    cannot both be true, so at each step the multiplier is the number of *claims* still
    represented among the unrejected hypotheses (Shaffer's refinement of Holm), not the
    number of hypotheses: with one claim nothing is inflated, with m claims the first
    step multiplies by m.
    """
    present = sorted((p, i, claim) for i, (claim, p) in enumerate(pvalues) if p is not None)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i, _) in enumerate(present):
        remaining = len({claim for _, _, claim in present[rank:]})
        running = max(running, min(1.0, remaining * p))
        out[i] = running
    return out


def adjust(tests: Sequence[ClaimTest]) -> None:
    """Adjust the superiority and equivalence p-values of all ``tests`` together."""
    flat = [(i, p) for i, t in enumerate(tests) for p in (t.p_superiority, t.p_equivalence)]
    adjusted = holm_by_claim(flat)
    for i, t in enumerate(tests):
        t.p_superiority_adjusted = adjusted[2 * i]
        t.p_equivalence_adjusted = adjusted[2 * i + 1]


def decide(test: ClaimTest, alpha: float) -> tuple[str, str]:
    """The verdict of an adjusted claim test and the part of the rule that decided it."""
    p_eq, p_sup = test.p_equivalence_adjusted, test.p_superiority_adjusted
    if p_eq is None or p_sup is None:
        return "inconclusive", "fewer than 2 pairs"
    if p_eq < alpha:
        return "refuted", f"an effect >= delta is excluded (adjusted p = {p_eq:.3g})"
    if p_sup < alpha:
        return "supported", f"an effect > 0 is shown (adjusted p = {p_sup:.3g})"
    return "inconclusive", "neither an effect nor its absence shown"


def seeds_needed(
    claimed: Sequence[float], delta: float, alpha: float, cap: int = 1000
) -> int | None:
    """Pairs a claim would need to be decided, if its effects kept their mean and spread.

    The smallest n at which the one-sided t bound at level ``alpha`` (use the strictest
    adjusted level, alpha / number of claims) clears the nearer decision boundary: 0
    (support) when the mean effect is positive, ``delta`` (refutation) when it is below
    ``delta``. ``None`` with fewer than 2 pairs or no spread; ``cap`` if beyond it.
    """
    xs = finite(claimed)
    if len(xs) < 2:
        return None
    mean, sd = float(np.mean(xs)), float(np.std(xs, ddof=1))
    if sd == 0.0:
        return None
    margins = [m for m in (mean, delta - mean) if m > 0]
    if not margins:
        return None
    margin = max(margins)
    for n in range(2, cap + 1):
        if stats.t.ppf(1 - alpha, n - 1) * sd / math.sqrt(n) <= margin:
            return n
    return cap

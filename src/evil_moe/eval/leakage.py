"""Leakage (SGTM paper §4.3): how many forget tokens a routed, ablated model is worth.

Standard models are trained on all retain data plus ``n`` forget tokens for several ``n``
(0 included); their held-out forget loss against ``n`` is the *baseline curve*. A routed
run's forget loss after ablation is mapped onto the curve: the ``n`` a standard model
would need to reach the same loss is the run's *equivalent forget tokens*, and

    leakage = equivalent forget tokens / undiscovered forget tokens the run trained on.

0 is perfect absorption; 1 is no better than data filtering.

The curve is interpolated in ``x = log(1 + n)``: first an isotonic (non-increasing) fit
by pool-adjacent-violators, so noise can never make the inverse ambiguous, then either a
monotone cubic (PCHIP, the default) or straight lines through the fitted points; the
inverse is found by Brent's method on the bracketing segment (all from SciPy). A loss outside the curve's range is never extrapolated: the estimate carries a
bound, ``"<"`` (the loss is above the curve's start: leakage is at most the value at the
smallest ``n``, which is 0 when ``n = 0`` is on the curve) or ``">"`` (below the curve's
end: at least the value at the largest ``n``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.interpolate import PchipInterpolator
from scipy.optimize import brentq, isotonic_regression

INTERPOLATIONS = ("pchip", "linear")


def isotonic_decreasing(y: Sequence[float], weights: Sequence[float] | None = None) -> np.ndarray:
    """Least-squares non-increasing fit of ``y`` (pool adjacent violators, SciPy)."""
    values = np.asarray(y, dtype=np.float64)
    if values.size == 0:
        return values
    return isotonic_regression(values, weights=weights, increasing=False).x


@dataclass
class LeakageEstimate:
    """Where one forget loss lies on the baseline curve."""

    #: equivalent forget tokens / undiscovered forget tokens (the bound's value if bounded)
    leakage: float
    #: equivalent forget tokens (the curve's edge if bounded)
    equivalent_tokens: float
    undiscovered_tokens: float
    #: ``""`` (interpolated), ``"<"`` (at most ``leakage``) or ``">"`` (at least)
    bound: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def display(self, digits: int = 3) -> str:
        return f"{self.bound}{self.leakage:.{digits}f}"


class BaselineCurve:
    """Forget loss of standard training against forget tokens seen, monotone, invertible.

    ``tokens`` may repeat (several seeds at one ``n``); points are averaged per ``n``
    before the isotonic fit, weighted by how many there were.
    """

    def __init__(
        self,
        tokens: Sequence[float],
        losses: Sequence[float],
        interpolation: str = "pchip",
    ):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}"
            )
        n = np.asarray(tokens, dtype=np.float64)
        y = np.asarray(losses, dtype=np.float64)
        if n.shape != y.shape or n.ndim != 1:
            raise ValueError("tokens and losses must be 1-D sequences of equal length")
        ok = np.isfinite(n) & np.isfinite(y)
        n, y = n[ok], y[ok]
        if (n < 0).any():
            raise ValueError("forget token counts must be >= 0")
        unique = np.unique(n)
        if len(unique) < 2:
            raise ValueError("a baseline curve needs at least two distinct forget-token counts")
        means = np.array([y[n == u].mean() for u in unique])
        counts = np.array([(n == u).sum() for u in unique], dtype=np.float64)
        self.tokens = unique
        self.raw_losses = means
        self.x = np.log1p(unique)
        self.y = isotonic_decreasing(means, counts)
        self.interpolation = interpolation
        self._pchip = PchipInterpolator(self.x, self.y) if interpolation == "pchip" else None

    # -- evaluation ----------------------------------------------------------------------

    def _at_x(self, x: float) -> float:
        if self._pchip is not None:
            return float(self._pchip(x))
        return float(np.interp(x, self.x, self.y))

    def loss_at(self, tokens: float) -> float:
        """Interpolated forget loss after ``tokens`` forget tokens (clamped to the range)."""
        x = min(max(math.log1p(max(tokens, 0.0)), self.x[0]), self.x[-1])
        return self._at_x(x)

    @property
    def loss_range(self) -> tuple[float, float]:
        """(highest, lowest) loss on the curve: at the fewest and the most forget tokens."""
        return float(self.y[0]), float(self.y[-1])

    def equivalent_tokens(self, loss: float) -> tuple[float, str]:
        """Forget tokens at which the curve reaches ``loss``, and a bound flag.

        ``("<")``: ``loss`` is above the curve's start (the value is the curve's smallest
        n); ``(">")``: below its end (the value is its largest n). On a flat stretch the
        middle of the stretch is returned.
        """
        top, bottom = self.loss_range
        if loss > top:
            return float(self.tokens[0]), "<"
        if loss < bottom:
            return float(self.tokens[-1]), ">"
        # Indices whose fitted loss equals ``loss`` (flat stretches) or brackets it.
        equal = np.nonzero(np.isclose(self.y, loss, rtol=0, atol=1e-12))[0]
        if len(equal):
            x = 0.5 * (self.x[equal[0]] + self.x[equal[-1]])
            return float(math.expm1(x)), ""
        i = int(np.nonzero(self.y > loss)[0][-1])  # y[i] > loss > y[i + 1]
        x = brentq(lambda v: self._at_x(v) - loss, self.x[i], self.x[i + 1], xtol=1e-12)
        return float(math.expm1(x)), ""

    def leakage(self, loss: float, undiscovered_tokens: float) -> LeakageEstimate:
        """Leakage of a run whose deployed forget loss is ``loss``."""
        if not undiscovered_tokens > 0:
            raise ValueError("leakage needs a positive number of undiscovered forget tokens")
        tokens, bound = self.equivalent_tokens(loss)
        return LeakageEstimate(tokens / undiscovered_tokens, tokens, undiscovered_tokens, bound)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens.tolist(),
            "raw_loss": self.raw_losses.tolist(),
            "fitted_loss": self.y.tolist(),
            "interpolation": self.interpolation,
        }

"""Leakage: isotonic fit, monotone interpolation and inversion, bounds on synthetic curves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evil_moe.eval.leakage import BaselineCurve, isotonic_decreasing

TOKENS = [0, 100, 1000, 10_000, 100_000]


def linear_curve(n: float) -> float:
    """A synthetic baseline: loss falls linearly in log(1 + n)."""
    return 8.0 - 0.4 * math.log1p(n)


@pytest.mark.parametrize("interpolation", ["pchip", "linear"])
def test_inversion_recovers_tokens_on_a_known_curve(interpolation):
    curve = BaselineCurve(TOKENS, [linear_curve(n) for n in TOKENS], interpolation)
    for n in (0, 50, 100, 3000, 42_000, 100_000):
        tokens, bound = curve.equivalent_tokens(linear_curve(n))
        assert bound == ""
        assert tokens == pytest.approx(n, rel=1e-6, abs=1e-6)
        assert curve.loss_at(n) == pytest.approx(linear_curve(n), abs=1e-9)


def test_leakage_is_equivalent_over_undiscovered_tokens():
    curve = BaselineCurve(TOKENS, [linear_curve(n) for n in TOKENS], "linear")
    est = curve.leakage(linear_curve(2000), undiscovered_tokens=20_000)
    assert est.bound == ""
    assert est.equivalent_tokens == pytest.approx(2000, rel=1e-6)
    assert est.leakage == pytest.approx(0.1, rel=1e-6)
    assert est.display() == "0.100"


@pytest.mark.parametrize("interpolation", ["pchip", "linear"])
def test_outside_the_curve_reports_a_bound_never_an_extrapolation(interpolation):
    curve = BaselineCurve(TOKENS, [linear_curve(n) for n in TOKENS], interpolation)
    above = curve.leakage(linear_curve(0) + 0.5, undiscovered_tokens=1000)
    assert above.bound == "<" and above.leakage == 0.0 and above.equivalent_tokens == 0.0
    assert above.display().startswith("<")
    below = curve.leakage(linear_curve(100_000) - 0.5, undiscovered_tokens=1000)
    assert below.bound == ">"
    assert below.equivalent_tokens == 100_000 and below.leakage == pytest.approx(100.0)
    # Without n = 0 on the curve, the lower bound is the curve's smallest n.
    partial = BaselineCurve(TOKENS[1:], [linear_curve(n) for n in TOKENS[1:]], interpolation)
    est = partial.leakage(linear_curve(10), undiscovered_tokens=1000)
    assert est.bound == "<" and est.equivalent_tokens == 100 and est.leakage == pytest.approx(0.1)


def test_isotonic_fit_is_non_increasing_and_pools_violators():
    assert isotonic_decreasing([3.0, 2.0, 1.0]).tolist() == [3.0, 2.0, 1.0]
    assert isotonic_decreasing([3.0, 1.0, 2.0]).tolist() == [3.0, 1.5, 1.5]
    fitted = isotonic_decreasing([1.0, 2.0, 3.0])
    assert np.allclose(fitted, [2.0, 2.0, 2.0])
    weighted = isotonic_decreasing([1.0, 2.0], weights=[3.0, 1.0])
    assert np.allclose(weighted, [1.25, 1.25])


@pytest.mark.parametrize("interpolation", ["pchip", "linear"])
def test_noisy_curve_is_made_monotone_and_inverts_uniquely(interpolation):
    rng = np.random.default_rng(0)
    tokens = [0, 30, 100, 300, 1000, 3000, 10_000, 30_000]
    losses = [linear_curve(n) + rng.normal(0, 0.3) for n in tokens]
    losses[3] = losses[2] + 0.2  # a clear violation
    curve = BaselineCurve(tokens, losses, interpolation)
    assert np.all(np.diff(curve.y) <= 1e-12)
    grid = np.expm1(np.linspace(0, math.log1p(30_000), 400))
    values = [curve.loss_at(float(n)) for n in grid]
    assert np.all(np.diff(values) <= 1e-9), "the interpolant must be non-increasing"
    top, bottom = curve.loss_range
    for loss in np.linspace(bottom + 1e-6, top - 1e-6, 25):
        tokens_eq, bound = curve.equivalent_tokens(float(loss))
        assert bound == ""
        assert curve.loss_at(tokens_eq) == pytest.approx(loss, abs=1e-6)


def test_flat_stretch_maps_to_its_middle():
    curve = BaselineCurve([0, 10, 100, 1000], [5.0, 4.0, 4.0, 3.0], "linear")
    tokens, bound = curve.equivalent_tokens(4.0)
    assert bound == ""
    assert math.log1p(tokens) == pytest.approx(0.5 * (math.log1p(10) + math.log1p(100)))


def test_repeated_points_are_averaged():
    curve = BaselineCurve([0, 0, 100, 100], [6.0, 7.0, 4.0, 5.0], "linear")
    assert curve.raw_losses.tolist() == [6.5, 4.5]


def test_bad_curves_are_rejected():
    with pytest.raises(ValueError, match="two distinct"):
        BaselineCurve([5, 5], [1.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        BaselineCurve([-5, 5], [1.0, 2.0])
    with pytest.raises(ValueError, match="interpolation"):
        BaselineCurve([0, 5], [1.0, 2.0], "cubic")
    curve = BaselineCurve([0, 5], [2.0, 1.0])
    with pytest.raises(ValueError, match="undiscovered"):
        curve.leakage(1.5, 0)

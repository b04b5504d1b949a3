"""The statistics and the verdict rules on synthetic numbers."""

from __future__ import annotations

import pytest

from evil_moe.eval.leakage import LeakageEstimate
from evil_moe.study.analysis import CLAIMS, RunRow, evaluate_claim
from evil_moe.study.spec import StudySpec
from evil_moe.study.stats import (
    combine_verdicts,
    paired_verdict,
    t_interval,
    t_ppf,
    threshold_verdict,
)


@pytest.mark.parametrize(
    ("df", "expected"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (100, 1.9840)]
)
def test_t_quantiles(df, expected):
    assert t_ppf(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert t_ppf(0.025, df) == pytest.approx(-expected, abs=1e-4)


def test_t_interval():
    iv = t_interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.hi - 2.0 == pytest.approx(4.3027 * 1.0 / 3**0.5, abs=1e-4)
    assert t_interval([1.0]).lo is None
    assert t_interval([]).mean is None
    assert t_interval([1.0, float("nan"), None, 3.0]).n == 2


def test_paired_rule():
    helpful = t_interval([-0.3, -0.2, -0.25])  # leakage fell
    harmful = t_interval([0.3, 0.2, 0.25])
    straddle = t_interval([-0.3, 0.2, 0.05])
    assert paired_verdict(helpful, "lower", "helps") == "supported"
    assert paired_verdict(harmful, "lower", "helps") == "refuted"
    assert paired_verdict(straddle, "lower", "helps") == "inconclusive"
    # a claim that the mechanism hurts (rows 6, 7)
    assert paired_verdict(harmful, "lower", "hurts") == "supported"
    assert paired_verdict(helpful, "lower", "hurts") == "refuted"
    # a metric where higher is better
    assert paired_verdict(harmful, "higher", "helps") == "supported"
    assert paired_verdict(t_interval([-1.0]), "lower", "helps") == "inconclusive"


def test_threshold_and_row_rules():
    assert threshold_verdict(t_interval([0.6, 0.7, 0.65]), 0.3, 0.1) == "supported"
    assert threshold_verdict(t_interval([0.01, 0.02, 0.03]), 0.3, 0.1) == "refuted"
    assert threshold_verdict(t_interval([0.05, 0.5, 0.3]), 0.3, 0.1) == "inconclusive"
    assert combine_verdicts(["supported", "inconclusive"]) == "supported"
    assert combine_verdicts(["refuted", "inconclusive"]) == "refuted"
    assert combine_verdicts(["supported", "refuted"]) == "inconclusive"
    assert combine_verdicts(["inconclusive"]) == "inconclusive"


def _row(name: str, seed: int, leakage: float, bound: str = "", **values) -> RunRow:
    return RunRow(
        name=name,
        corpus="bilingual",
        seed=seed,
        recall=0.5,
        method="sgtm",
        values={"leakage": leakage, **values},
        leakage=LeakageEstimate(leakage, leakage * 1000, 1000, bound),
        relearn_censored=False,
        record={},
    )


def _claim(row: int, metric: str = "leakage"):
    return next(c for c in CLAIMS if c.row == row and c.metric == metric)


def test_claims_on_synthetic_runs():
    spec = StudySpec()
    rows = [_row("single", s, 0.30 + 0.01 * s) for s in range(4)]
    rows += [_row("shared_single", s, 0.10 + 0.012 * s) for s in range(4)]  # clearly lower
    rows += [_row("demix", s, 0.90 + 0.02 * s) for s in range(4)]  # clearly higher
    rows += [_row("fine4", s, 0.30 + (0.2 if s % 2 else -0.2)) for s in range(4)]  # noise
    one = evaluate_claim(_claim(1), rows, spec)
    assert one["verdict"] == "supported"
    (variant,) = one["variants"]
    assert variant["interval"]["hi"] < 0 and variant["interval"]["n"] == 4
    assert evaluate_claim(_claim(7), rows, spec)["verdict"] == "supported"
    two = evaluate_claim(_claim(2), rows, spec)
    assert two["verdict"] == "inconclusive"
    assert "not in this study" in two["variants"][1]["reason"]  # fine8 was not run
    # a mechanism that was supposed to help but raised leakage is refuted
    bad = [_row("single", s, 0.3) for s in range(3)] + [
        _row("shared_single", s, 0.6 + 0.01 * s) for s in range(3)
    ]
    assert evaluate_claim(_claim(1), bad, spec)["verdict"] == "refuted"


def test_bounded_values_are_counted():
    spec = StudySpec()
    rows = [_row("single", s, 0.0, "<") for s in range(3)]
    rows += [_row("shared_single", s, 0.0, "<") for s in range(3)]
    result = evaluate_claim(_claim(1), rows, spec)
    assert result["variants"][0]["censored_pairs"] == 3
    assert result["verdict"] == "inconclusive"

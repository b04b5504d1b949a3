"""Claims, the verdict rule (superiority, equivalence, Holm), guards and validity gates,
on synthetic studies whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evil_moe.study.analysis import Analysis, RunRow
from evil_moe.study.claims import evaluate, gates, load_claims, paired
from evil_moe.study.spec import REFERENCE_METHODS, GridBlock, RunSpec, StudySpec
from evil_moe.study.stats import (
    adjust,
    claim_test,
    decide,
    holm,
    holm_by_claim,
    one_sided_p,
    t_interval,
)
from evil_moe.train.config import load_config
from evil_moe.train.variants import VARIANTS

# -- the claims table --------------------------------------------------------------------

#: each row's claims and the reference each must be compared with (issue 9)
EXPECTED_REFERENCES = {
    "1a": ("shared_masked", "single_wide", "log_leakage", "helps"),
    "1b": ("shared_open", "single", "log_leakage", "helps"),
    "2a": ("fine4", "single", "log_leakage", "helps"),
    "2b": ("fine8", "single", "log_leakage", "helps"),
    "2c": ("fine4", "random4", "nmi_excess", "helps"),
    "3a": ("expert_choice", "fine4", "log_leakage", "helps"),
    "3b": ("balanced", "fine4", "log_leakage", "helps"),
    "3c": ("expert_choice", "fine4", "balance_cv", "helps"),
    "3d": ("balanced", "fine4", "balance_cv", "helps"),
    "4a": ("aux_balance_quarantine", "soft_gate", "log_leakage", "helps"),
    "4b": ("aux_balance_quarantine", "soft_gate", "balance_cv", "helps"),
    "5a": ("zloss", "soft_gate", "loss_spikes", "helps"),
    "5b": ("zloss", "soft_gate", "final_train_loss", "helps"),
    "6a": ("global_balance", "soft_gate", "log_leakage", "hurts"),
    "7a": ("demix_masked", "single", "log_leakage", "hurts"),
    "7b": ("demix", "single", "log_leakage", "hurts"),
}


@pytest.mark.parametrize("claim_id", sorted(EXPECTED_REFERENCES))
def test_each_claim_has_its_own_reference(claim_id):
    _, claims = load_claims()
    claim = next(c for c in claims if c.id == claim_id)
    assert (claim.variant, claim.reference, claim.metric, claim.expect) == EXPECTED_REFERENCES[
        claim_id
    ]
    assert int(claim_id[0]) == claim.row
    known = set(VARIANTS) | set(REFERENCE_METHODS)
    assert claim.variant in known and claim.reference in known


def test_the_table_has_seven_rows_each_with_a_claim():
    rows, claims = load_claims()
    assert [r["row"] for r in rows] == list(range(1, 8))
    assert {c.row for c in claims} == set(range(1, 8))
    assert len({c.id for c in claims}) == len(claims)


def test_contrasts_are_capacity_and_mechanism_matched():
    """Each claim's variant and reference differ in exactly the mechanism claimed."""

    def model(name):
        return load_config(None, [f"variant={name}"]).model

    wide, masked = model("single_wide"), model("shared_masked")
    assert (
        wide.mlp_width + wide.shared_expert_width == masked.mlp_width + masked.shared_expert_width
    )
    assert model("fine4").n_experts == model("expert_choice").n_experts == 4
    assert model("random4").n_experts == model("oracle4").n_experts == 4
    for name in ("aux_balance_quarantine", "zloss", "global_balance"):
        assert model(name).gate.enabled and model(name).n_experts == model("soft_gate").n_experts
    assert load_config(None, ["variant=demix_masked"]).train.method == "demix_masked"


# -- the rule ------------------------------------------------------------------------------


def test_t_interval_matches_the_t_distribution():
    iv = t_interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.hi - 2.0 == pytest.approx(4.3027 * 1.0 / math.sqrt(3), abs=1e-4)
    assert t_interval([1.0]).lo is None
    assert t_interval([]).mean is None
    assert t_interval([1.0, float("nan"), None, 3.0]).n == 2


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04, (None skipped): x3, x2, x1 with running maximum
    assert holm([0.04, 0.01, None, 0.02]) == [
        pytest.approx(0.04),
        pytest.approx(0.03),
        None,
        pytest.approx(0.04),
    ]
    assert holm([0.5, 0.6]) == [pytest.approx(1.0), pytest.approx(1.0)]


def test_holm_by_claim_counts_claims_not_hypotheses():
    # one claim: its two tests are not inflated
    assert holm_by_claim([(0, 0.03), (0, 0.4)]) == [pytest.approx(0.03), pytest.approx(0.4)]
    # three claims: each step multiplies by the claims still among the unrejected tests
    adjusted = holm_by_claim([(0, 0.01), (0, 0.9), (1, 0.02), (1, 0.8), (2, 0.5), (2, 0.6)])
    assert adjusted[0] == pytest.approx(0.03)
    assert adjusted[2] == pytest.approx(0.06)  # claim 0's other test is still in play
    assert adjusted[4] == pytest.approx(1.0)
    # once both tests of claims 0 and 1 are rejected, only claim 2 is left: x1
    adjusted = holm_by_claim([(0, 0.001), (0, 0.002), (1, 0.003), (1, 0.004), (2, 0.03)])
    assert adjusted[4] == pytest.approx(0.03)


def _decide(effects, delta=0.05, family=1):
    test = claim_test(effects, delta)
    others = [claim_test([0.0, 0.01, -0.01], delta) for _ in range(family - 1)]
    adjust([test, *others])
    return decide(test, 0.05)[0]


def test_a_clear_effect_is_supported():
    assert _decide([0.20, 0.25, 0.22, 0.27, 0.21]) == "supported"


def test_a_reversed_effect_is_refuted():
    assert _decide([-0.20, -0.25, -0.22, -0.27, -0.21]) == "refuted"


def test_an_effect_excluded_below_delta_is_refuted_by_equivalence():
    # significantly positive, but significantly smaller than delta: refuted, not supported
    assert _decide([0.010, 0.012, 0.011, 0.013, 0.009, 0.011], delta=0.05) == "refuted"
    # no effect at all, measured precisely
    assert _decide([0.001, -0.002, 0.0, 0.002, -0.001, 0.001], delta=0.05) == "refuted"


def test_noise_is_inconclusive():
    assert _decide([0.3, -0.2, 0.1, -0.25, 0.2]) == "inconclusive"
    assert _decide([0.2]) == "inconclusive"  # one pair: no interval


def test_holm_can_turn_a_marginal_support_into_inconclusive():
    effects = [0.05, 0.30, 0.12, -0.02, 0.25]
    p = one_sided_p(effects, 0.0, "greater")
    assert 0.01 < p < 0.05 and one_sided_p(effects, 0.2, "less") > 0.1
    assert _decide(effects, delta=0.2, family=1) == "supported"
    assert _decide(effects, delta=0.2, family=10) == "inconclusive"


# -- claims and gates on a synthetic study ----------------------------------------------------


def _row(name, seed, values, block="b", corpus="bilingual", censored=()):
    cfg = load_config(None, [f"variant={name}"] if name in VARIANTS else [])
    run = RunSpec("grid", name, corpus, seed, 0.2, None, cfg, key=f"{name}{seed}", block=block)
    full = {
        "leakage": None,
        "log_leakage": None,
        "forget_loss": None,
        "retain_cost": 0.0,
        "nmi_excess": None,
        "loss_spikes": 0.0,
        "final_train_loss": 3.0,
        "balance_cv": None,
    } | values
    record = {"result": {"metrics": {"parameters": {"quarantine": 100}, "final_train_loss": 3.0}}}
    return RunRow(run, "sgtm", full, None, set(censored), record)


def _analysis(rows):
    blocks = list(dict.fromkeys(r.run.block for r in rows))
    spec = StudySpec(grid=[GridBlock(name=b) for b in blocks])
    a = Analysis(spec, {}, [], {}, rows, [], [], [])
    evaluate(a)
    return a


def _valid_controls(n=6):
    rng = np.random.default_rng(1)
    rows = [_row("filter", s, {"leakage": 1.0 + 0.02 * rng.standard_normal()}) for s in range(n)]
    rows += [
        _row("oracle4", s, {"nmi_excess": 0.5 + 0.02 * rng.standard_normal()}, block="m")
        for s in range(n)
    ]
    rows += [
        _row("random4", s, {"nmi_excess": 0.02 * rng.standard_normal()}, block="m")
        for s in range(n)
    ]
    return rows


def test_claims_pair_by_seed_and_decide_against_their_own_reference():
    rows = _valid_controls()
    rows += [_row("single", s, {"log_leakage": -2.0 + 0.1 * s}) for s in range(6)]
    # demix_masked leaks e^2 times more than single in every seed (row 7: supported)
    rows += [_row("demix_masked", s, {"log_leakage": 0.01 * (s % 2) + 0.1 * s}) for s in range(6)]
    # fine4 equals single to within 1%: a factor of 2 (delta = ln 2) is excluded (refuted)
    rows += [_row("fine4", s, {"log_leakage": -2.0 + 0.1 * s + 0.01 * (-1) ** s}) for s in range(6)]
    a = _analysis(rows)
    assert a.verdicts_issued
    by_id = {c["id"]: c for c in a.claims}
    assert by_id["7a"]["verdict"] == "supported" and by_id["7a"]["block"] == "b"
    assert by_id["7a"]["difference"]["mean"] == pytest.approx(2.0 + 0.005, abs=1e-9)
    assert by_id["2a"]["verdict"] == "refuted"
    assert by_id["1a"]["verdict"] == "not in this study"
    # fine4 vs random4 (2c): fine4 has no nmi values here, so no pairs
    assert by_id["2c"]["verdict"] == "inconclusive"
    diffs, censored = paired(rows, "demix_masked", "single", "log_leakage")
    assert len(diffs) == 6 and censored == 0


def test_a_planned_variant_without_finished_runs_is_not_finished_not_absent():
    rows = _valid_controls()
    rows += [_row("single", s, {"log_leakage": -2.0 + 0.1 * s}) for s in range(6)]
    a = _analysis(rows)
    a.planned = {"single", "shared_masked", "single_wide"}
    evaluate(a)
    by_id = {c["id"]: c for c in a.claims}
    assert by_id["1a"]["verdict"] == "not finished"
    assert "resume" in by_id["1a"]["reason"]
    # fine8 is not planned: absent from the study, not pending
    assert by_id["2b"]["verdict"] == "not in this study"


def test_pairs_need_the_same_block_seed_and_sweep():
    rows = [_row("single", 0, {"leakage": 0.1}), _row("fine4", 0, {"leakage": 0.2}, block="other")]
    assert paired(rows, "fine4", "single", "leakage") == ([], 0)
    rows.append(_row("fine4", 0, {"leakage": 0.25}, censored={"leakage"}))
    assert paired(rows, "fine4", "single", "leakage") == ([pytest.approx(0.15)], 1)


def test_the_retain_guard_downgrades_absorption_bought_with_retain_loss():
    rows = _valid_controls()
    rows += [_row("single", s, {"log_leakage": -1.0, "retain_cost": 0.0}) for s in range(6)]
    rows += [
        _row("fine4", s, {"log_leakage": -4.0 + 0.01 * s, "retain_cost": 0.3 + 0.01 * s})
        for s in range(6)
    ]
    claim = next(c for c in _analysis(rows).claims if c["id"] == "2a")
    assert claim["verdict"] == "inconclusive" and "retain-cost guard" in claim["rule"]


def test_stability_claims_need_an_unstable_reference():
    rows = _valid_controls()
    rows += [
        _row(n, s, {"loss_spikes": 0.0}, block="st")
        for n in ("soft_gate", "zloss")
        for s in range(4)
    ]
    claim = next(c for c in _analysis(rows).claims if c["id"] == "5a")
    assert claim["verdict"] == "inconclusive" and "no instability" in claim["reason"]
    rows = _valid_controls()
    rows += [_row("soft_gate", s, {"loss_spikes": 4.0 + s % 2}, block="st") for s in range(6)]
    rows += [_row("zloss", s, {"loss_spikes": 0.0}, block="st") for s in range(6)]
    claim = next(c for c in _analysis(rows).claims if c["id"] == "5a")
    assert claim["verdict"] == "supported"


@pytest.mark.parametrize("broken", ["filter", "oracle", "random", "missing"])
def test_gates_fail_on_broken_studies_and_withhold_verdicts(broken):
    rows = _valid_controls()
    if broken == "filter":  # filtering that does not leak like filtering: the curve is off
        rows = [
            _row("filter", r.run.seed, {"leakage": 0.4}) if r.name == "filter" else r for r in rows
        ]
    elif broken == "oracle":  # the positive control does not specialise
        rows = [r for r in rows if r.name != "oracle4"]
        rows += [_row("oracle4", s, {"nmi_excess": 0.01 * (-1) ** s}, block="m") for s in range(6)]
    elif broken == "random":  # the negative control specialises as much as the oracle
        rows = [r for r in rows if r.name != "random4"]
        rows += [_row("random4", s, {"nmi_excess": 0.5 + 0.01 * s}, block="m") for s in range(6)]
    else:
        rows = [r for r in rows if r.name != "filter"]
    rows += [_row("single", s, {"leakage": 0.3}) for s in range(6)]
    a = _analysis(rows)
    failed = [g["gate"] for g in a.gates if not g["passed"]]
    expected = {
        "filter": "data filtering has leakage about 1",
        "missing": "data filtering has leakage about 1",
        "oracle": "oracle assignment specialises",
        "random": "random assignment does not specialise",
    }[broken]
    assert expected in failed and not a.verdicts_issued
    assert len(failed) == (2 if broken == "oracle" else 1)  # random is judged against oracle
    assert all(g["passed"] for g in gates(_analysis(_valid_controls())))


def test_a_claim_is_decided_separately_in_each_block():
    """Two regimes (blocks) give two decisions, never one pooled over both."""
    rows = _valid_controls()
    for block, gap in (("low_recall", 2.0), ("high_recall", 0.0)):
        rows += [_row("single", s, {"log_leakage": -1 + 0.05 * s}, block=block) for s in range(6)]
        rows += [
            _row(
                "demix_masked",
                s,
                {"log_leakage": -1 + 0.05 * s + gap + 0.001 * (-1) ** s},
                block=block,
            )
            for s in range(6)
        ]
    decided = {c["block"]: c["verdict"] for c in _analysis(rows).claims if c["id"] == "7a"}
    assert decided == {"low_recall": "supported", "high_recall": "refuted"}


def test_seeds_needed_by_hand():
    from evil_moe.study.stats import seeds_needed

    # mean 0, sd 1, delta ln 2: refutation needs t(1 - a, n - 1) / sqrt(n) <= 0.693
    effects = [1.0, -1.0, 1.0, -1.0]
    n = seeds_needed(effects, math.log(2), 0.05)
    from scipy import stats

    sd = float(np.std(effects, ddof=1))
    assert stats.t.ppf(0.95, n - 1) * sd / math.sqrt(n) <= math.log(2)
    assert stats.t.ppf(0.95, n - 2) * sd / math.sqrt(n - 1) > math.log(2)
    assert seeds_needed(effects, math.log(2), 0.005) > n  # a stricter level needs more
    assert seeds_needed([3.0, 3.2, 2.9], math.log(2), 0.05) == 2  # a large effect: support
    assert seeds_needed([1.0], 0.5, 0.05) is None


def test_log_leakage_differences_are_log_ratios_of_leakage():
    """Paired runs share their undiscovered tokens, so a log-leakage difference is the log
    of the ratio of the two runs' (1 + equivalent tokens)."""
    from evil_moe.eval.leakage import BaselineCurve
    from evil_moe.study.analysis import run_row

    curve = BaselineCurve([0, 100, 1000, 10000], [11.0, 8.0, 6.0, 4.0])

    def record(forget_loss):
        loss = {
            "forget_undiscovered": {"trained": 4.0, "ablated": forget_loss},
            "retain": {"trained": 3.0, "ablated": 3.1},
        }
        return {
            "result": {
                "metrics": {"method": "sgtm", "loss": loss, "final_train_loss": 3.0},
                "exposure": {"forget_undiscovered": 5000},
            }
        }

    run = RunSpec("grid", "single", "bilingual", 0, 0.5, None, load_config(None, []), key="k")
    rows = [
        run_row(run, record(loss), {"bilingual": curve}, {("bilingual", 0): 3.0}, True, {})
        for loss in (8.0, 6.0)
    ]
    assert rows[0].values["log_leakage"] == pytest.approx(math.log(101 / 5000), rel=1e-6)
    diff = rows[1].values["log_leakage"] - rows[0].values["log_leakage"]
    assert diff == pytest.approx(math.log(1001 / 101), rel=1e-6)
    assert rows[0].values["retain_cost"] == pytest.approx(0.1)

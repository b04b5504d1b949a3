"""Claims, verdicts and validity gates: does the study answer MISSION.md's table?

The claims are data (``claims.toml`` beside this file). Each is decided, separately in
every grid block where both its variant and its reference ran (a block is one regime: a
corpus and recall, or a sweep), on seed-paired differences
``d = metric(variant) - metric(reference)`` by the rule of
:mod:`evil_moe.study.stats` (two one-sided t-tests against 0 and the preset's minimum
effect ``delta``, Holm-adjusted over every claim the study can test), then two guards:

* **retain-cost guard**: a supported claim about absorption (leakage or forget loss)
  whose variant raises the retain cost by more than ``verdict.retain_guard`` on average
  is downgraded to inconclusive (it forgets by breaking the model);
* **equal quarantine**: a claim whose variant and reference differ in quarantine
  parameters (beyond a soft gate's logit weights) is flagged.

**Validity gates** show that the instrument works; verdicts are issued only when every
gate passes:

* data filtering has leakage about 1 (its interval within ``verdict.filter_leakage``);
* the oracle control (forget mode m -> expert m) specialises: its mode-expert NMI above
  the permutation null has an interval above 0;
* random assignment does not: its interval lies entirely below the oracle's.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from evil_moe.study.stats import (
    Interval,
    adjust,
    claim_test,
    decide,
    seeds_needed,
    t_interval,
)

if TYPE_CHECKING:
    from evil_moe.study.analysis import Analysis, RunRow

ABSORPTION_METRICS = ("log_leakage", "leakage", "forget_loss")
#: contrasts reported without a verdict (references and the amplifier), per block
EFFECTS = [("amplify", "single"), ("filter", "single"), ("none", "single")]
EFFECT_METRICS = ("log_leakage", "forget_loss", "retain_cost", "relearn_steps")


@dataclass(frozen=True)
class Claim:
    """One contrast of the claims table."""

    id: str
    row: int
    variant: str
    reference: str
    metric: str
    expect: str  # "helps" or "hurts"
    text: str
    needs: str = ""  # "" or "instability"


def load_claims() -> tuple[list[dict[str, Any]], list[Claim]]:
    """The table's rows (mechanism, note, review) and its claims, from ``claims.toml``."""
    data = tomllib.loads(resources.files("evil_moe.study").joinpath("claims.toml").read_text())
    claims = [Claim(**c) for c in data["claims"]]
    for c in claims:
        if c.expect not in ("helps", "hurts") or c.needs not in ("", "instability"):
            raise ValueError(f"claim {c.id}: bad expect {c.expect!r} or needs {c.needs!r}")
    return data["rows"], claims


def paired(
    rows: list[RunRow], variant: str, reference: str, metric: str
) -> tuple[list[float], int]:
    """``metric(variant) - metric(reference)`` per shared pair key, and how many pairs
    involve a censored (bound) value."""
    ref = {r.pair_key: r for r in rows if r.name == reference}
    diffs, censored = [], 0
    for r in rows:
        other = ref.get(r.pair_key)
        if r.name != variant or other is None:
            continue
        a, b = r.values.get(metric), other.values.get(metric)
        if a is None or b is None:
            continue
        diffs.append(a - b)
        censored += metric in r.censored or metric in other.censored
    return diffs, censored


def _quarantine_size(rows: list[RunRow], name: str) -> int | None:
    """Quarantine parameters of ``name``'s runs, without a soft gate's logit weights."""
    for r in rows:
        if r.name == name:
            model = r.run.config.model
            params = r.record["result"]["metrics"].get("parameters", {})
            logits = (model.n_experts + 1) * model.d_model * model.n_layer
            return params.get("quarantine", 0) - (logits if model.gate.enabled else 0)
    return None


def evaluate(a: Analysis) -> None:
    """Fill ``a.claims``, ``a.gates`` and ``a.verdicts_issued``."""
    from evil_moe.study.analysis import METRICS

    v = a.spec.verdict
    alpha = 1 - v.confidence
    table, claims = load_claims()
    names = {r.name for r in a.rows}
    entries, tests = [], []
    for c in claims:
        helpful = METRICS[c.metric][1]
        base: dict[str, Any] = {
            **c.__dict__,
            "metric_label": METRICS[c.metric][0],
            "helpful": helpful,
            "delta": v.delta_of(c.metric),
            "block": None,
        }
        missing = [n for n in (c.variant, c.reference) if n not in names]
        if missing and set(missing) <= a.planned:
            entries.append(
                base
                | {
                    "verdict": "not finished",
                    "reason": f"runs of {', '.join(missing)} not finished yet (resume the study)",
                }
            )
            continue
        if missing:
            entries.append(
                base
                | {"verdict": "not in this study", "reason": f"no runs of {', '.join(missing)}"}
            )
            continue
        found = False
        for block in a.spec.grid:
            rows = [r for r in a.rows if r.run.block == block.name]
            diffs, censored = paired(rows, c.variant, c.reference, c.metric)
            if not diffs:
                continue
            found = True
            entry = base | {"block": block.name}
            if c.needs == "instability" and not _unstable(rows, c.reference):
                entry.update(
                    verdict="inconclusive",
                    reason=f"{c.reference} never spiked or diverged: no instability to stabilise",
                )
                entries.append(entry)
                continue
            sign = (1 if helpful == "higher" else -1) * (1 if c.expect == "helps" else -1)
            claimed = [sign * d for d in diffs]
            test = claim_test(claimed, entry["delta"], v.confidence)
            cost, _ = paired(rows, c.variant, c.reference, "retain_cost")
            forget, _ = paired(rows, c.variant, c.reference, "forget_loss")
            leakage, _ = paired(rows, c.variant, c.reference, "leakage")
            sizes = (_quarantine_size(rows, c.variant), _quarantine_size(rows, c.reference))
            entry.update(
                difference=t_interval(diffs, v.confidence).to_dict(),
                censored_pairs=censored,
                retain_cost_difference=t_interval(cost, v.confidence).to_dict(),
                forget_loss_difference=t_interval(forget, v.confidence).to_dict(),
                leakage_difference=t_interval(leakage, v.confidence).to_dict(),
                equal_quarantine=sizes[0] == sizes[1],
                quarantine_parameters=list(sizes),
            )
            entries.append(entry)
            tests.append((entry, test, claimed))
        if not found:
            entries.append(
                base
                | {
                    "verdict": "inconclusive",
                    "reason": f"no block has pairs of {c.variant} and {c.reference} "
                    f"with {c.metric} values",
                }
            )
    adjust([t for _, t, _ in tests])
    for entry, test, claimed in tests:
        entry["pairs_for_decision"] = seeds_needed(claimed, entry["delta"], alpha / len(tests))
        verdict, rule = decide(test, alpha)
        cost = Interval(**entry["retain_cost_difference"])
        if (
            verdict == "supported"
            and entry["metric"] in ABSORPTION_METRICS
            and entry["expect"] == "helps"
            and cost.mean is not None
            and cost.mean > v.retain_guard
        ):
            verdict = "inconclusive"
            rule = f"retain-cost guard: retain cost up {cost.mean:.3f} > {v.retain_guard} nats"
        entry.update(verdict=verdict, rule=rule, test=test.to_dict())
    a.claims = entries
    a.effects = effects(a)
    a.table = table
    a.gates = gates(a)
    a.verdicts_issued = all(g["passed"] for g in a.gates)


def effects(a: Analysis) -> list[dict[str, Any]]:
    """Paired differences of the reported contrasts (no verdict), per block."""
    conf = a.spec.verdict.confidence
    out = []
    for variant, reference in EFFECTS:
        for block in a.spec.grid:
            rows = [r for r in a.rows if r.run.block == block.name]
            entry: dict[str, Any] = {
                "variant": variant,
                "reference": reference,
                "block": block.name,
            }
            for metric in EFFECT_METRICS:
                diffs, _ = paired(rows, variant, reference, metric)
                entry[metric] = t_interval(diffs, conf).to_dict()
            if any(entry[m]["n"] for m in EFFECT_METRICS):
                out.append(entry)
    return out


def _unstable(rows: list[RunRow], name: str) -> bool:
    """Did any run of ``name`` spike or diverge (non-finite final training loss)?"""
    for r in rows:
        if r.name != name:
            continue
        final = r.record["result"]["metrics"].get("final_train_loss")
        diverged = final is not None and not math.isfinite(final)
        if (r.values.get("loss_spikes") or 0) > 0 or diverged:
            return True
    return False


def _values(rows: list[RunRow], name: str, metric: str) -> list[float | None]:
    return [r.values.get(metric) for r in rows if r.name == name]


def gates(a: Analysis) -> list[dict[str, Any]]:
    """The validity gates and whether each passed (a missing control fails its gate)."""
    conf = a.spec.verdict.confidence
    lo_ok, hi_ok = a.spec.verdict.filter_leakage
    out = []
    filt = t_interval(_values(a.rows, "filter", "leakage"), conf)
    out.append(
        {
            "gate": "data filtering has leakage about 1",
            "rule": f"filter's leakage interval within [{lo_ok}, {hi_ok}]",
            "value": filt.to_dict(),
            "passed": filt.lo is not None and lo_ok <= filt.lo and filt.hi <= hi_ok,
        }
    )
    oracle = t_interval(_values(a.rows, "oracle4", "nmi_excess"), conf)
    random = t_interval(_values(a.rows, "random4", "nmi_excess"), conf)
    out.append(
        {
            "gate": "oracle assignment specialises",
            "rule": "oracle4's mode-expert NMI above its permutation null: interval above 0",
            "value": oracle.to_dict(),
            "passed": oracle.lo is not None and oracle.lo > 0,
        }
    )
    out.append(
        {
            "gate": "random assignment does not specialise",
            "rule": "random4's NMI-above-null interval lies entirely below oracle4's",
            "value": random.to_dict(),
            "passed": random.hi is not None and oracle.lo is not None and random.hi < oracle.lo,
        }
    )
    return out

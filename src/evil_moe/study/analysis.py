"""From stored runs to numbers: leakage, retain cost, paired comparisons and verdicts.

Definitions (also written into every report):

* **Forget tokens** are counted as *exposure*: tokens the run actually trained on, from
  the loop's deterministic batch order. With a fixed number of steps a run sees only part
  of its data set (or some of it twice); the SGTM paper's single epoch is the case where
  exposure equals the data set.
* **Baseline curve** (per corpus and seed): standard training (``train.method=none``) of
  the *same testbed architecture* as ``single`` (its quarantine block is just more
  parameters, trained on everything) on all retain data plus n forget tokens. Its
  y value is the held-out forget loss *without* ablation (``trained``): these are
  standard models. Same architecture means same capacity, so the curve measures data
  exposure and nothing else.
* **Deployed loss** of a grid run: after ablation (``ablated``) for routed methods (sgtm,
  gradient_routing, demix), as trained for standard ones (none, filter).
* **Leakage** of a grid run: its deployed held-out forget loss on undiscovered data mapped
  onto the curve of its own corpus and seed, divided by the undiscovered forget tokens it
  trained on. Losses outside the curve give a bound (``<``/``>``), never an extrapolation;
  in intervals a bounded value counts as the bound (reported as censored).
* **Retain cost**: deployed retain loss minus the retain loss of the retain-only oracle
  (the curve's n = 0 run of the same corpus and seed).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from evil_moe.eval.leakage import BaselineCurve, LeakageEstimate
from evil_moe.study.spec import REFERENCE_METHODS, StudySpec, expand
from evil_moe.study.stats import (
    Interval,
    combine_verdicts,
    paired_verdict,
    t_interval,
    threshold_verdict,
)
from evil_moe.study.worker import deployed_view
from evil_moe.train.variants import TABLE_ROW

#: MISSION.md's table: row -> (mechanism, the note's verdict, the review's comment)
TABLE = {
    1: (
        "shared always-on path + routed quarantine path, both additive (DeepSeekMoE shared "
        "experts)",
        "YES",
        "only if quarantine features stay present on non-routed examples",
    ),
    2: (
        "split one quarantine block into K small quarantine experts (fine-grained experts)",
        "MAYBE",
        '"different hack modes absorb into different blocks" is an overreach: test it',
    ),
    3: (
        "expert-choice or balanced (BASE / optimal-transport) assignment inside the "
        "quarantine bank only",
        "MAYBE",
        "supported only as anti-collapse, not as absorption",
    ),
    4: (
        "weak load-balancing loss over the K quarantine experts only (Switch aux loss)",
        "MAYBE",
        "balancing only",
    ),
    5: ("router z-loss on routing logits (ST-MoE)", "MAYBE (stability only)", "correctly scoped"),
    6: ("global balancing between retain and quarantine", "probably wrong: fights absorption", ""),
    7: ("hard forward sequestering of experts (DEMix-style dispatch)", "NO for absorption", ""),
}

#: metrics per run: (name, label, helpful direction or "" for none)
METRICS = {
    "leakage": ("leakage", "lower"),
    "retain_cost": ("retain cost (nats)", "lower"),
    "forget_loss": ("deployed forget loss, undiscovered (nats)", "higher"),
    "retain_loss": ("deployed retain loss (nats)", "lower"),
    "relearn_steps": ("relearning steps", "higher"),
    "balance_cv": ("expert-load CV", "lower"),
    "dead_experts": ("dead experts", "lower"),
    "nmi": ("mode-expert NMI (ablation)", "higher"),
    "logit_scale": ("router logit scale", "lower"),
    "loss_spikes": ("loss spikes", "lower"),
    "gn_ratio": ("quarantine grad norm, unlabelled forget / retain", "higher"),
}

RULES = {
    "paired": (
        "d = metric(variant) - metric(reference), paired by corpus, seed and recall (the "
        "same data and monitor labels); mean and {conf:.0%} Student-t interval of d. A claim "
        "that the mechanism helps is supported if the whole interval lies on the helpful "
        "side of 0, refuted if it lies on the harmful side, inconclusive otherwise (also "
        "with fewer than 2 pairs). A claim that it hurts: the reverse."
    ),
    "threshold": (
        "{conf:.0%} Student-t interval of the mean mode-expert NMI of the loss-increase "
        "matrix (one expert ablated at a time, hack corpus): supported if it lies above "
        "{sup}, refuted if below {ref}, inconclusive otherwise."
    ),
    "row": (
        "A row with several variants is supported if at least one variant's claim is "
        "supported and none refuted, refuted if at least one is refuted and none "
        "supported, inconclusive otherwise. The row's verdict is that of its first claim."
    ),
}


@dataclass
class Claim:
    """One testable claim of a table row."""

    row: int
    variants: tuple[str, ...]
    metric: str
    text: str
    reference: str = "single"
    expect: str = "helps"  # or "hurts"
    rule: str = "paired"  # or "threshold"
    corpus: str | None = None


CLAIMS = [
    Claim(1, ("shared_single",), "leakage", "a shared always-on expert lowers leakage"),
    Claim(2, ("fine4", "fine8"), "leakage", "K small quarantine experts lower leakage"),
    Claim(
        2,
        ("fine4", "fine8"),
        "nmi",
        "different hack modes absorb into different experts",
        reference="",
        rule="threshold",
        corpus="hacks",
    ),
    Claim(
        3,
        ("expert_choice", "balanced"),
        "leakage",
        "expert-choice / balanced assignment lowers leakage",
    ),
    Claim(
        3,
        ("expert_choice", "balanced"),
        "balance_cv",
        "it prevents collapse: lower expert-load CV than top-1 routing (fine4)",
        reference="fine4",
    ),
    Claim(
        4, ("aux_balance_quarantine",), "leakage", "a quarantine-only balance loss lowers leakage"
    ),
    Claim(
        4,
        ("aux_balance_quarantine",),
        "balance_cv",
        "it balances the experts: lower gate-load CV than the plain soft gate",
        reference="soft_gate",
    ),
    Claim(
        5,
        ("zloss",),
        "logit_scale",
        "z-loss stabilises the router: smaller router logits than the plain soft gate",
        reference="soft_gate",
    ),
    Claim(
        6,
        ("global_balance",),
        "leakage",
        "retain-vs-quarantine balancing raises leakage (fights absorption)",
        expect="hurts",
    ),
    Claim(
        6,
        ("global_balance",),
        "leakage",
        "global balancing raises leakage against the same soft gate without it",
        reference="soft_gate",
        expect="hurts",
    ),
    Claim(7, ("demix",), "leakage", "hard forward dispatch raises leakage", expect="hurts"),
]

#: effects reported for every variant (no verdict): metric, reference
EFFECTS = [("leakage", "single"), ("retain_cost", "single"), ("relearn_steps", "single")]


@dataclass
class RunRow:
    """One finished grid run and its derived numbers."""

    name: str
    corpus: str
    seed: int
    recall: float
    method: str
    values: dict[str, float | None]
    leakage: LeakageEstimate | None
    relearn_censored: bool
    record: dict[str, Any] = field(repr=False)

    @property
    def pair_key(self) -> tuple[str, int, float]:
        return (self.corpus, self.seed, self.recall)


@dataclass
class Analysis:
    """Everything the report shows."""

    spec: StudySpec
    curves: dict[tuple[str, int], BaselineCurve]
    baseline: list[dict[str, Any]]
    oracle: dict[tuple[str, int], dict[str, float]]
    rows: list[RunRow]
    missing: list[str]
    summary: list[dict[str, Any]]
    verdicts: list[dict[str, Any]]
    references: list[dict[str, Any]]
    separation: list[dict[str, Any]]
    notes: list[str]
    #: distinct runs analysed
    n_runs: int = 0


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _forget_exposure(result: dict[str, Any]) -> float:
    return float(sum(v for k, v in result["exposure"].items() if k.startswith("forget")))


def build_curves(
    records: list[dict[str, Any]], interpolation: str, pooled: bool = False
) -> tuple[dict[tuple[str, int], BaselineCurve], list[dict[str, Any]], dict, list[str]]:
    """Baseline curves and retain-only oracles per (corpus, seed); with ``pooled`` every
    seed of a corpus gets the curve fitted to all its seeds' points."""
    points: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
    table: list[dict[str, Any]] = []
    oracle: dict[tuple[str, int], dict[str, float]] = {}
    notes: list[str] = []
    for rec in records:
        if rec["kind"] != "baseline":
            continue
        res = rec["result"]
        loss = res["metrics"]["loss"]
        forget = _num(loss.get("forget_undiscovered", {}).get("trained"))
        exposure = _forget_exposure(res)
        key = (rec["corpus"], rec["seed"])
        table.append(
            {
                "corpus": rec["corpus"],
                "seed": rec["seed"],
                "forget_tokens": rec["forget_tokens"],
                "exposure": exposure,
                "forget_loss": forget,
                "retain_loss": _num(loss["retain"]["trained"]),
            }
        )
        if forget is not None:
            points[key].append((exposure, forget))
        if rec["forget_tokens"] == 0:
            oracle[key] = {"retain": loss["retain"]["trained"], "forget": forget}
    if pooled:
        by_corpus: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for (corpus, _), pts in points.items():
            by_corpus[corpus].extend(pts)
        points = {key: by_corpus[key[0]] for key in points}
    curves = {}
    for key, pts in points.items():
        try:
            curves[key] = BaselineCurve(
                [p[0] for p in pts], [p[1] for p in pts], interpolation=interpolation
            )
        except ValueError as err:
            notes.append(f"no baseline curve for {key[0]} seed {key[1]}: {err}")
    return curves, table, oracle, notes


def run_row(
    rec: dict[str, Any],
    curves: dict[tuple[str, int], BaselineCurve],
    oracle: dict[tuple[str, int], dict[str, float]],
) -> RunRow:
    """Derived numbers of one grid run."""
    res = rec["result"]
    m = res["metrics"]
    method = m["method"]
    view = deployed_view(method)
    loss = m["loss"]
    forget = _num(loss["forget_undiscovered"][view])
    retain = _num(loss["retain"][view])
    key = (rec["corpus"], rec["seed"])
    undiscovered = float(res["exposure"].get("forget_undiscovered", 0))
    estimate = None
    if key in curves and forget is not None and undiscovered > 0:
        estimate = curves[key].leakage(forget, undiscovered)
    spec = m.get("specialization") or {}
    routing = spec.get("routing") or None
    ablation = spec.get("ablation") or {}
    gate = (res.get("gate_load") or {}).get("forget")
    relearn = res.get("relearning")
    relearn_steps, censored = None, False
    if relearn is not None:
        if relearn["steps"] is None:
            relearn_steps, censored = float(relearn["max_steps"]), True
        else:
            relearn_steps = float(relearn["steps"])
    gn = res.get("gradnorms") or {}
    q = gn.get("quarantine", {})
    ratio = None
    if _num(q.get("forget_unlabeled")) and _num(q.get("retain_unlabeled")):
        ratio = q["forget_unlabeled"] / q["retain_unlabeled"]
    stability = m.get("stability") or {}
    values: dict[str, float | None] = {
        "leakage": estimate.leakage if estimate else None,
        "retain_cost": (
            retain - oracle[key]["retain"] if key in oracle and retain is not None else None
        ),
        "forget_loss": forget,
        "retain_loss": retain,
        "relearn_steps": relearn_steps,
        "balance_cv": _num(routing["cv"]) if routing else (_num(gate["cv"]) if gate else None),
        "dead_experts": _num(routing["dead_experts"]) if routing else None,
        "nmi": _num(ablation.get("nmi_mode_expert")),
        "logit_scale": _num(stability.get("router_logit_scale")),
        "loss_spikes": _num(stability.get("loss_spikes")),
        "gn_ratio": ratio,
    }
    return RunRow(
        name=rec["name"],
        corpus=rec["corpus"],
        seed=rec["seed"],
        recall=rec["recall"],
        method=method,
        values=values,
        leakage=estimate,
        relearn_censored=censored,
        record=rec,
    )


def paired_differences(
    rows: list[RunRow], variant: str, reference: str, metric: str, corpus: str | None = None
) -> tuple[list[float], int]:
    """``metric(variant) - metric(reference)`` per matching (corpus, seed, recall);
    also the number of pairs involving a bound (censored) value."""
    ref = {r.pair_key: r for r in rows if r.name == reference}
    diffs, censored = [], 0
    for r in rows:
        if r.name != variant or (corpus and r.corpus != corpus) or r.pair_key not in ref:
            continue
        a, b = r.values.get(metric), ref[r.pair_key].values.get(metric)
        if a is None or b is None:
            continue
        diffs.append(a - b)
        if metric == "leakage" and (r.leakage.bound or ref[r.pair_key].leakage.bound):  # type: ignore[union-attr]
            censored += 1
        if metric == "relearn_steps" and (r.relearn_censored or ref[r.pair_key].relearn_censored):
            censored += 1
    return diffs, censored


def evaluate_claim(claim: Claim, rows: list[RunRow], spec: StudySpec) -> dict[str, Any]:
    """A claim's per-variant results and its combined verdict."""
    conf = spec.verdict.confidence
    present = {r.name for r in rows}
    per_variant = []
    for variant in claim.variants:
        entry: dict[str, Any] = {"variant": variant}
        if variant not in present or (claim.reference and claim.reference not in present):
            missing = [v for v in (variant, claim.reference) if v and v not in present]
            entry.update(verdict="inconclusive", reason=f"not in this study: {', '.join(missing)}")
            per_variant.append(entry)
            continue
        if claim.rule == "threshold":
            values = [
                r.values[claim.metric]
                for r in rows
                if r.name == variant
                and (claim.corpus is None or r.corpus == claim.corpus)
                and r.values.get(claim.metric) is not None
            ]
            interval = t_interval(values, conf)
            verdict = threshold_verdict(
                interval, spec.verdict.nmi_supported, spec.verdict.nmi_refuted
            )
            entry.update(interval=interval.to_dict(), verdict=verdict)
            if not values:
                entry["reason"] = f"no {claim.corpus or ''} runs with this metric".replace(
                    "  ", " "
                )
        else:
            diffs, censored = paired_differences(
                rows, variant, claim.reference, claim.metric, claim.corpus
            )
            interval = t_interval(diffs, conf)
            helpful = METRICS[claim.metric][1]
            verdict = paired_verdict(interval, helpful, claim.expect)
            entry.update(interval=interval.to_dict(), verdict=verdict, censored_pairs=censored)
            if interval.n < 2:
                entry["reason"] = f"{interval.n} pair(s): an interval needs at least 2"
        per_variant.append(entry)
    verdict = combine_verdicts([v["verdict"] for v in per_variant])
    return {
        "row": claim.row,
        "claim": claim.text,
        "metric": claim.metric,
        "metric_label": METRICS[claim.metric][0],
        "helpful": METRICS[claim.metric][1],
        "reference": claim.reference or None,
        "expect": claim.expect,
        "rule": claim.rule,
        "corpus": claim.corpus,
        "variants": per_variant,
        "verdict": verdict,
    }


def _summary(rows: list[RunRow], conf: float) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, float], list[RunRow]] = defaultdict(list)
    for r in rows:
        groups[(r.name, r.corpus, r.recall)].append(r)
    out = []
    for (name, corpus, recall), members in groups.items():
        entry: dict[str, Any] = {
            "name": name,
            "row": TABLE_ROW.get(name),
            "corpus": corpus,
            "recall": recall,
            "seeds": sorted(r.seed for r in members),
            "bounds": "".join(sorted({r.leakage.bound for r in members if r.leakage})),
            "leakage_display": [r.leakage.display() for r in members if r.leakage],
            "parameters": members[0].record["result"]["metrics"].get("parameters", {}),
        }
        for metric in METRICS:
            entry[metric] = t_interval([r.values[metric] for r in members], conf).to_dict()
        out.append(entry)
    order = {n: i for i, n in enumerate(_name_order())}
    out.sort(key=lambda e: (e["corpus"], e["recall"], order.get(e["name"], 99), e["name"]))
    return out


def _name_order() -> list[str]:
    from evil_moe.train.variants import VARIANTS

    return [*VARIANTS, *REFERENCE_METHODS]


def _separation(rows: list[RunRow], conf: float) -> list[dict[str, Any]]:
    """Does SGTM (``single``) separate from filtering and from no routing?"""
    out = []
    keys = sorted({(r.corpus, r.recall) for r in rows})
    for corpus, recall in keys:
        intervals = {}
        for name in ("single", "filter", "none"):
            vals = [
                r.values["leakage"]
                for r in rows
                if r.name == name and r.corpus == corpus and r.recall == recall
            ]
            intervals[name] = t_interval(vals, conf)
        s = intervals["single"]
        entry: dict[str, Any] = {
            "corpus": corpus,
            "recall": recall,
            **{k: v.to_dict() for k, v in intervals.items()},
        }
        for other in ("filter", "none"):
            o = intervals[other]
            ok = None
            if s.hi is not None and o.lo is not None:
                ok = bool(s.hi < o.lo)
            entry[f"separated_from_{other}"] = ok
        out.append(entry)
    return out


def analyse(spec: StudySpec, records: list[dict[str, Any]]) -> Analysis:
    """The study's numbers, comparisons and verdicts from its stored runs."""
    by_key = {r["key"]: r for r in records}
    # Each expected role gets its stored run (a run may serve two roles, see unique_runs).
    records, missing = [], []
    for run in expand(spec):
        stored = by_key.get(run.key)
        if stored is None:
            missing.append(run.label)
            continue
        records.append(
            stored
            | {
                "kind": run.kind,
                "name": run.name,
                "corpus": run.corpus,
                "seed": run.seed,
                "recall": run.recall,
                "forget_tokens": run.forget_tokens,
            }
        )
    curves, baseline, oracle, notes = build_curves(
        records, spec.measure.interpolation, pooled=spec.measure.curve == "pooled"
    )
    rows = [run_row(rec, curves, oracle) for rec in records if rec["kind"] == "grid"]
    conf = spec.verdict.confidence
    claims = [evaluate_claim(c, rows, spec) for c in CLAIMS]
    verdicts = []
    for row, (mechanism, note, review) in TABLE.items():
        row_claims = [c for c in claims if c["row"] == row]
        variants = sorted({v for c in CLAIMS if c.row == row for v in c.variants})
        effects = []
        for variant in variants:
            for metric, reference in EFFECTS:
                diffs, censored = paired_differences(rows, variant, reference, metric)
                effects.append(
                    {
                        "variant": variant,
                        "metric": metric,
                        "reference": reference,
                        "interval": t_interval(diffs, conf).to_dict(),
                        "censored_pairs": censored,
                    }
                )
        verdicts.append(
            {
                "row": row,
                "mechanism": mechanism,
                "note_verdict": note,
                "review": review,
                "variants": variants,
                "verdict": row_claims[0]["verdict"] if row_claims else "inconclusive",
                "claims": row_claims,
                "effects": effects,
            }
        )
    references = []
    for name in ("filter", "none", "gradient_routing", "soft_gate"):
        if not any(r.name == name for r in rows):
            continue
        entry = {"name": name, "effects": []}
        for metric, reference in EFFECTS[:2]:
            diffs, censored = paired_differences(rows, name, reference, metric)
            entry["effects"].append(
                {
                    "metric": metric,
                    "reference": reference,
                    "interval": t_interval(diffs, conf).to_dict(),
                    "censored_pairs": censored,
                }
            )
        references.append(entry)
    return Analysis(
        spec=spec,
        curves=curves,
        baseline=baseline,
        oracle=oracle,
        rows=rows,
        missing=missing,
        summary=_summary(rows, conf),
        verdicts=verdicts,
        references=references,
        separation=_separation(rows, conf),
        notes=notes,
        n_runs=len({r["key"] for r in records}),
    )


def interval_of(entry: dict[str, Any]) -> Interval:
    return Interval(**entry)

"""From stored runs to numbers: leakage, retain cost and every per-run measurement.

Definitions (also written into every report):

* **Forget tokens** are counted as *exposure*: tokens the run actually trained on, from
  the loop's deterministic batch order (with ``train.epochs`` every sequence is seen
  exactly that often, so every arm sees the same retain tokens).
* **Baseline curve** (per corpus; pooled over seeds by default): standard training
  (``train.method=none``) of the *same testbed architecture* as ``single`` on all retain
  data plus n forget tokens. Its y value is the held-out forget loss as trained.
* **Deployed loss** of a grid run: after ablation for routed methods (sgtm,
  gradient_routing, demix, demix_masked), as trained for standard ones (none, filter).
* **Leakage** of a grid run: its deployed held-out forget loss on undiscovered data
  mapped onto its corpus's curve, divided by the undiscovered forget tokens it trained on.
  **Log leakage** ``ln((1 + equivalent tokens) / undiscovered tokens)``: paired runs share
  their data, so a paired difference is the log of the ratio of their leakages (a
  difference of ln 2 halves or doubles it), and it stays finite at zero leakage.
  Losses outside the curve give a bound (``<``/``>``), never an extrapolation; in
  intervals a bounded value counts as the bound (reported as censored).
* **Retain cost**: deployed retain loss minus the retain loss of the retain-only oracle
  (the curve's n = 0 run of the same corpus and seed; the corpus mean if that seed has
  no curve run).
* **Relearning steps**: fine-tuning steps on forget data until the held-out forget loss
  reaches one *common target* per block, corpus, recall and seed: the pre-ablation
  (as-trained) undiscovered forget loss of the ``single`` run there. Capped runs count
  as the cap (censored).

Claims, their verdicts and the validity gates are in :mod:`evil_moe.study.claims`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evil_moe.eval.leakage import BaselineCurve, LeakageEstimate
from evil_moe.eval.relearning import steps_to_target
from evil_moe.study.spec import RunSpec, StudySpec, expand
from evil_moe.study.stats import t_interval
from evil_moe.study.worker import deployed_view

#: metrics per run: (name, label, helpful direction or "" for none)
METRICS = {
    "log_leakage": ("log leakage, ln((1 + equivalent tokens) / undiscovered tokens)", "lower"),
    "leakage": ("leakage", "lower"),
    "forget_loss": ("deployed forget loss, undiscovered (nats)", "higher"),
    "retain_cost": ("retain cost (nats)", "lower"),
    "retain_loss": ("deployed retain loss (nats)", "lower"),
    "relearn_steps": ("relearning steps to the common target", "higher"),
    "retain_ft_return": ("forget-loss drop after retain fine-tuning (nats)", "lower"),
    "balance_cv": ("expert-load CV", "lower"),
    "dead_experts": ("dead experts", "lower"),
    "nmi": ("mode-expert NMI (mean ablation)", "higher"),
    "nmi_excess": ("mode-expert NMI above its permutation null", "higher"),
    "cancellation": ("cancellation ratio (sum of expert norms / norm of sum)", "lower"),
    "loss_spikes": ("loss spikes", "lower"),
    "final_train_loss": ("final training loss (diverged = ln V)", "lower"),
    "retain_last20": ("held-out retain loss change over the last 20% of training", ""),
    "gn_ratio": ("quarantine grad norm, unlabelled forget / retain", "higher"),
    "amp_recall": ("amplifier recall (undiscovered forget)", "higher"),
    "amp_precision": ("amplifier precision at the training mix", "higher"),
    "router_share": ("share of quarantine parameters the router controls", ""),
}


@dataclass
class RunRow:
    """One finished grid run (in one of its roles) and its derived numbers."""

    run: RunSpec
    method: str
    values: dict[str, float | None]
    leakage: LeakageEstimate | None
    censored: set[str]
    record: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def pair_key(self) -> tuple[Any, ...]:
        return self.run.pair_key


@dataclass
class Analysis:
    """Everything the report shows (claims and gates are added by ``claims.evaluate``)."""

    spec: StudySpec
    curves: dict[str, BaselineCurve]
    baseline: list[dict[str, Any]]
    oracle: dict[tuple[str, int], float]
    rows: list[RunRow]
    missing: list[str]
    summary: list[dict[str, Any]]
    notes: list[str]
    n_runs: int = 0
    #: grid variants the spec plans (a claim whose runs are all missing is "not finished")
    planned: set[str] = field(default_factory=set)
    claims: list[dict[str, Any]] = field(default_factory=list)
    #: contrasts reported without a verdict (the amplifier, the reference methods)
    effects: list[dict[str, Any]] = field(default_factory=list)
    #: MISSION.md's table rows (mechanism, the note's verdict, the review's comment)
    table: list[dict[str, Any]] = field(default_factory=list)
    gates: list[dict[str, Any]] = field(default_factory=list)
    verdicts_issued: bool = False


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
    records: list[tuple[RunSpec, dict[str, Any]]], interpolation: str, pooled: bool
) -> tuple[dict[str, BaselineCurve], list[dict[str, Any]], dict, list[str]]:
    """Baseline curves (per corpus, or per ``corpus/seed`` when not pooled), the curve
    points, retain-only oracle retain losses per (corpus, seed), and notes."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    table: list[dict[str, Any]] = []
    oracle: dict[tuple[str, int], float] = {}
    notes: list[str] = []
    for run, rec in records:
        res = rec["result"]
        loss = res["metrics"]["loss"]
        forget = _num(loss.get("forget_undiscovered", {}).get("trained"))
        exposure = _forget_exposure(res)
        table.append(
            {
                "corpus": run.corpus,
                "seed": run.seed,
                "forget_tokens": run.forget_tokens,
                "exposure": exposure,
                "forget_loss": forget,
                "retain_loss": _num(loss["retain"]["trained"]),
            }
        )
        if forget is not None:
            points[curve_key(run.corpus, run.seed, pooled)].append((exposure, forget))
        if run.forget_tokens == 0:
            oracle[(run.corpus, run.seed)] = loss["retain"]["trained"]
    curves = {}
    for key, pts in points.items():
        try:
            curves[key] = BaselineCurve(
                [p[0] for p in pts], [p[1] for p in pts], interpolation=interpolation
            )
        except ValueError as err:
            notes.append(f"no baseline curve for {key}: {err}")
    return curves, table, oracle, notes


def curve_key(corpus: str, seed: int, pooled: bool) -> str:
    return corpus if pooled else f"{corpus}/{seed}"


def _oracle_retain(oracle: dict[tuple[str, int], float], corpus: str, seed: int) -> float | None:
    if (corpus, seed) in oracle:
        return oracle[(corpus, seed)]
    same = [v for (c, _), v in oracle.items() if c == corpus]
    return float(np.mean(same)) if same else None


def _final_train_loss(m: dict[str, Any], vocab: int) -> float:
    """The last logged training loss; a diverged run (non-finite) counts as ln(vocab)."""
    loss = _num(m.get("final_train_loss"))
    return loss if loss is not None else math.log(vocab)


def run_row(
    run: RunSpec,
    rec: dict[str, Any],
    curves: dict[str, BaselineCurve],
    oracle: dict[tuple[str, int], float],
    pooled: bool,
    targets: dict[tuple[Any, ...], float],
) -> RunRow:
    """Derived numbers of one grid run."""
    res = rec["result"]
    m = res["metrics"]
    method = m["method"]
    view = deployed_view(method)
    loss = m["loss"]
    forget = _num(loss["forget_undiscovered"][view])
    retain = _num(loss["retain"][view])
    curve = curves.get(curve_key(run.corpus, run.seed, pooled))
    undiscovered = float(res["exposure"].get("forget_undiscovered", 0))
    estimate = None
    censored: set[str] = set()
    if curve is not None and forget is not None and undiscovered > 0:
        estimate = curve.leakage(forget, undiscovered)
        if estimate.bound:
            censored.update(("leakage", "log_leakage"))
    spec = m.get("specialization") or {}
    routing = spec.get("routing") or None
    ablation = spec.get("ablation") or {}
    gate = (res.get("gate_load") or {}).get("forget")
    relearn_steps = None
    curve_points = res.get("relearning")
    target = targets.get(run.pair_key)
    if curve_points and target is not None:
        steps = steps_to_target([tuple(p) for p in curve_points], target)
        if steps is None:
            relearn_steps = float(curve_points[-1][0])
            censored.add("relearn_steps")
        else:
            relearn_steps = float(steps)
    retain_ft = res.get("retain_finetune") or {}
    ft_forget = retain_ft.get("forget")
    gn = res.get("gradnorms") or {}
    q = gn.get("quarantine", {})
    ratio = None
    if _num(q.get("forget_unlabeled")) and _num(q.get("retain_unlabeled")):
        ratio = q["forget_unlabeled"] / q["retain_unlabeled"]
    stability = m.get("stability") or {}
    nmi, null = _num(ablation.get("nmi_mode_expert")), _num(ablation.get("nmi_null_mean"))
    amp = res.get("amplifier") or {}
    conv = m.get("retain_convergence") or {}
    oracle_retain = _oracle_retain(oracle, run.corpus, run.seed)
    values: dict[str, float | None] = {
        "log_leakage": (
            math.log((1 + estimate.equivalent_tokens) / estimate.undiscovered_tokens)
            if estimate
            else None
        ),
        "leakage": estimate.leakage if estimate else None,
        "forget_loss": forget,
        "retain_cost": retain - oracle_retain
        if oracle_retain is not None and retain is not None
        else None,
        "retain_loss": retain,
        "relearn_steps": relearn_steps,
        "retain_ft_return": ft_forget[0][1] - ft_forget[-1][1] if ft_forget else None,
        "balance_cv": _num(routing["cv"]) if routing else (_num(gate["cv"]) if gate else None),
        "dead_experts": _num(routing["dead_experts"]) if routing else None,
        "nmi": nmi,
        "nmi_excess": nmi - null if nmi is not None and null is not None else None,
        "cancellation": _num((spec.get("cancellation") or {}).get("mean")),
        "loss_spikes": _num(stability.get("loss_spikes")),
        "final_train_loss": _final_train_loss(m, run.config.model.vocab_size),
        "retain_last20": _num(conv.get("last20_change")),
        "gn_ratio": ratio,
        "amp_recall": _num(amp.get("recall")),
        "amp_precision": _num(amp.get("precision")),
        "router_share": router_share(m.get("parameters") or {}),
    }
    return RunRow(run, method, values, estimate, censored, rec)


def router_share(params: dict[str, Any]) -> float | None:
    """Share of quarantine parameters whose gradients the backward router assigns."""
    total, routed = params.get("quarantine"), params.get("router_controlled")
    if not total or routed is None:
        return None
    return routed / total


def relearning_targets(
    pairs: list[tuple[RunSpec, dict[str, Any]]],
) -> dict[tuple[Any, ...], float]:
    """The common relearning target of each pair key: ``single``'s as-trained forget loss."""
    targets = {}
    for run, rec in pairs:
        if run.name == "single":
            loss = _num(rec["result"]["metrics"]["loss"]["forget_undiscovered"]["trained"])
            if loss is not None:
                targets[run.pair_key] = loss
    return targets


def summarise(rows: list[RunRow], conf: float) -> list[dict[str, Any]]:
    """Mean and interval of every metric per (block, name, corpus, recall, sweep)."""
    groups: dict[tuple[Any, ...], list[RunRow]] = defaultdict(list)
    for r in rows:
        run = r.run
        groups[(run.block, run.name, run.corpus, run.recall, tuple(run.sweep.items()))].append(r)
    out = []
    for (block, name, corpus, recall, sweep), members in groups.items():
        params = members[0].record["result"]["metrics"].get("parameters", {})
        entry: dict[str, Any] = {
            "block": block,
            "name": name,
            "corpus": corpus,
            "recall": recall,
            "sweep": dict(sweep),
            "seeds": sorted(r.run.seed for r in members),
            "bounds": "".join(sorted({r.leakage.bound for r in members if r.leakage})),
            "parameters": params,
        }
        for metric in METRICS:
            entry[metric] = t_interval([r.values[metric] for r in members], conf).to_dict()
        entry["modes"] = _mode_losses(members, conf)
        out.append(entry)
    return out


def _mode_losses(members: list[RunRow], conf: float) -> dict[str, dict[str, Any]]:
    """Per forget mode: loss on its distinctive tokens as trained and ablated, and the
    increase that ablation causes (intervals over the group's runs)."""
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in members:
        spec = r.record["result"]["metrics"].get("specialization") or {}
        for mode, d in (spec.get("distinctive") or {}).items():
            per[mode]["trained"].append(d["trained"])
            per[mode]["ablated"].append(d["ablated"])
            per[mode]["increase"].append(d["ablated"] - d["trained"])
    return {
        mode: {k: t_interval(v, conf).to_dict() for k, v in values.items()}
        for mode, values in per.items()
    }


def analyse(spec: StudySpec, records: list[dict[str, Any]]) -> Analysis:
    """The study's numbers, claims, verdicts and gates from its stored runs."""
    from evil_moe.study.claims import evaluate

    by_key = {r["key"]: r for r in records}
    found: list[tuple[RunSpec, dict[str, Any]]] = []
    missing = []
    for run in expand(spec):
        stored = by_key.get(run.key)
        if stored is None:
            missing.append(run.label)
        else:
            found.append((run, stored))
    pooled = spec.measure.curve == "pooled"
    baseline = [(run, rec) for run, rec in found if run.kind == "baseline"]
    grid = [(run, rec) for run, rec in found if run.kind == "grid"]
    curves, table, oracle, notes = build_curves(baseline, spec.measure.interpolation, pooled)
    targets = relearning_targets(grid)
    rows = [run_row(run, rec, curves, oracle, pooled, targets) for run, rec in grid]
    analysis = Analysis(
        spec=spec,
        curves=curves,
        baseline=table,
        oracle=oracle,
        rows=rows,
        missing=missing,
        summary=summarise(rows, spec.verdict.confidence),
        notes=notes,
        n_runs=len({r["key"] for _, r in found}),
        planned={run.name for run in expand(spec) if run.kind == "grid"},
    )
    evaluate(analysis)
    return analysis

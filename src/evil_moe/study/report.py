"""The study report: ``verdicts.json`` (everything, machine-readable), ``report.md`` and a
self-contained ``report.html`` rendered from Jinja2 templates, and ``plots/*.png``."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from evil_moe.io import write_bytes
from evil_moe.study.analysis import METRICS, Analysis
from evil_moe.study.spec import baseline_recall

#: columns of the arms table: (metric, header)
ARM_COLUMNS = [
    ("leakage", "leakage"),
    ("log_leakage", "log leakage"),
    ("forget_loss", "forget loss (deployed)"),
    ("retain_cost", "retain cost"),
    ("relearn_steps", "relearn steps"),
    ("retain_ft_return", "forget back after retain FT"),
    ("balance_cv", "load CV"),
    ("nmi_excess", "NMI above null"),
    ("cancellation", "cancellation"),
    ("router_share", "router share"),
    ("retain_last20", "retain Δ last 20%"),
    ("loss_spikes", "spikes"),
    ("final_train_loss", "final train loss"),
    ("amp_recall", "amp. recall"),
    ("amp_precision", "amp. precision"),
]


def definitions(a: Analysis) -> dict[str, str]:
    """The definitions and rules every report states."""
    v, m = a.spec.verdict, a.spec.measure
    pooled = "pooled over seeds" if m.curve == "pooled" else "one per seed"
    return {
        "leakage": (
            "Baseline curve per corpus (" + pooled + "): standard training of the same testbed "
            "on all retain data plus n forget tokens, held-out forget loss against forget "
            f"tokens trained on (recall {baseline_recall(a.spec)} splits the held-out data), "
            f"made non-increasing by isotonic regression and interpolated ({m.interpolation}) "
            "in log(1 + n). A grid run's leakage is the n at which the curve reaches its "
            "deployed held-out undiscovered forget loss, divided by the undiscovered forget "
            "tokens it trained on; outside the curve it is a bound, never an extrapolation."
        ),
        "decision": (
            "Per claim, d = metric(variant) - metric(reference) for each pair of runs sharing "
            "block, corpus, recall, seed and sweep value; c = d signed so that positive means "
            "the claimed direction. Two one-sided t-tests: superiority (H0: mean c <= 0) and "
            "equivalence (H0: mean c >= delta, the metric's minimum effect). All claims' "
            "p-values are adjusted together by Holm's method at alpha = "
            f"{1 - v.confidence:.2f}. Refuted: an effect >= delta is excluded (which covers "
            "no effect, a smaller one, or the reverse). Supported: an effect > 0 is shown and "
            "the claim is not refuted. Otherwise inconclusive."
        ),
        "guard": (
            f"A supported absorption claim (leakage, forget loss) whose variant raises the "
            f"retain cost by more than {v.retain_guard} nats on average is downgraded to "
            "inconclusive."
        ),
        "relearning": (
            "Relearning: an ablated copy fine-tuned on forget data; steps until its held-out "
            "forget loss reaches the common target of its pair (the as-trained undiscovered "
            f"forget loss of `single` there), capped at {m.relearn_steps} steps (censored)."
        ),
    }


def context(a: Analysis, source: str, command: str = "") -> dict[str, Any]:
    """Everything the report shows, as plain data (this is ``verdicts.json``)."""
    spec = a.spec
    rows = []
    for row in a.table:
        claims = [c for c in a.claims if c["row"] == row["row"]]
        first = [c for c in claims if claims and c["id"] == claims[0]["id"]]
        headline = "; ".join(
            f"{c['verdict']}" + (f" ({c['block']})" if c["block"] else "") for c in first
        )
        rows.append({**row, "claims": claims, "headline": headline or None})
    return {
        "study": spec.study.name,
        "description": spec.study.description,
        "study_id": spec.study_id,
        "source": source,
        "command": command,
        "confidence": spec.verdict.confidence,
        "delta": {k: spec.verdict.delta_of(k) for k in METRICS if spec.verdict.delta_of(k)},
        "runs": a.n_runs,
        "missing_runs": a.missing,
        "notes": a.notes,
        "gates": a.gates,
        "verdicts_issued": a.verdicts_issued,
        "rows": rows,
        "claims": a.claims,
        "effects": a.effects,
        "summary": a.summary,
        "baseline": a.baseline,
        "curves": {k: c.to_dict() for k, c in a.curves.items()},
        "definitions": definitions(a),
        "metrics": {k: {"label": v[0], "helpful": v[1]} for k, v in METRICS.items()},
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def _iv(entry: dict[str, Any] | None, digits: int = 3) -> str:
    if not entry or entry.get("mean") is None:
        return "n/a"
    if entry.get("lo") is None:
        return f"{_fmt(entry['mean'], digits)} (n={entry['n']})"
    return (
        f"{_fmt(entry['mean'], digits)} [{_fmt(entry['lo'], digits)}, {_fmt(entry['hi'], digits)}]"
    )


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("evil_moe.study", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["fmt"] = _fmt
    env.filters["iv"] = _iv
    return env


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def verdict_rows(a: Analysis) -> list[list[str]]:
    """One printable row per claim: id, contrast, metric, difference, verdict."""
    rows = []
    for c in a.claims:
        verdict = c["verdict"] if a.verdicts_issued or "test" not in c else f"({c['verdict']})"
        rows.append(
            [
                c["id"],
                c["block"] or "",
                f"{c['variant']} vs {c['reference']}",
                c["metric"],
                _iv(c.get("difference")),
                verdict,
            ]
        )
    return rows


def write_report(
    a: Analysis, out: str | Path, source: str = "", command: str = ""
) -> dict[str, Path]:
    """Write ``report.html``, ``report.md``, ``verdicts.json`` and ``plots/*.png``."""
    from evil_moe.study.plots import all_plots

    out = Path(out)
    data = _finite(context(a, source, command))
    plots = {k: v for k, v in all_plots(a).items() if v is not None} if a.rows or a.baseline else {}
    for name, png in plots.items():
        write_bytes(out / "plots" / f"{name}.png", png)
    env = _environment()
    common = {"d": data, "columns": ARM_COLUMNS, "plots": list(plots)}
    md = env.get_template("report.md.j2").render(**common)
    embedded = {k: base64.b64encode(v).decode("ascii") for k, v in plots.items()}
    page = env.get_template("report.html.j2").render(**common, images=embedded)
    write_bytes(out / "report.md", md.encode("utf-8"))
    write_bytes(out / "report.html", page.encode("utf-8"))
    payload = json.dumps(data, indent=1, default=str, allow_nan=False)
    write_bytes(out / "verdicts.json", (payload + "\n").encode("utf-8"))
    return {"html": out / "report.html", "md": out / "report.md", "json": out / "verdicts.json"}

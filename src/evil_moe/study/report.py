"""The study report: ``report.html`` (self-contained), ``report.md`` and ``verdicts.json``.

    analysis = analyse(spec, store.runs())
    write_report(analysis, "runs/study", source="preset quick")

Plots are drawn with matplotlib (Agg), saved under ``DIR/plots/`` for the Markdown report
and embedded as base64 PNG in the HTML one, so ``report.html`` opens anywhere offline.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from evil_moe.study.analysis import (
    CLAIMS,
    METRICS,
    RULES,
    TABLE,
    Analysis,
    RunRow,
    interval_of,
)
from evil_moe.study.stats import Interval

Block = tuple[str, Any]  # ("h2" | "h3" | "p" | "table" | "img" | "pre", content)


# -- formatting ------------------------------------------------------------------------


def _iv(entry: dict[str, Any] | Interval | None, digits: int = 3) -> str:
    if entry is None:
        return "n/a"
    interval = entry if isinstance(entry, Interval) else interval_of(entry)
    return interval.display(digits)


def _signed(entry: dict[str, Any], digits: int = 3) -> str:
    interval = interval_of(entry)
    if interval.mean is None:
        return "n/a"
    if interval.lo is None or interval.hi is None:
        return f"{interval.mean:+.{digits}f} (n={interval.n})"
    return f"{interval.mean:+.{digits}f} [{interval.lo:+.{digits}f}, {interval.hi:+.{digits}f}]"


def _verdict_mark(verdict: str) -> str:
    return {"supported": "supported", "refuted": "REFUTED", "inconclusive": "inconclusive"}.get(
        verdict, verdict
    )


# -- plots -----------------------------------------------------------------------------


def _figure_png(draw: Callable[[Any], None], size: tuple[float, float]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size, dpi=100)
    try:
        draw(fig)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _colors(names: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return {n: cmap(i % 20) for i, n in enumerate(names)}


def _names(a: Analysis) -> list[str]:
    seen: list[str] = []
    for r in a.rows:
        if r.name not in seen:
            seen.append(r.name)
    return seen


def _corpora(a: Analysis) -> list[str]:
    return sorted({r.corpus for r in a.rows} | {b["corpus"] for b in a.baseline})


def plot_curves(a: Analysis) -> bytes:
    corpora = _corpora(a)

    def draw(fig: Any) -> None:
        for i, corpus in enumerate(corpora):
            ax = fig.add_subplot(1, len(corpora), i + 1)
            pts = [b for b in a.baseline if b["corpus"] == corpus and b["forget_loss"] is not None]
            seeds = sorted({b["seed"] for b in pts})
            for seed in seeds:
                xs = [np.log1p(b["exposure"]) for b in pts if b["seed"] == seed]
                ys = [b["forget_loss"] for b in pts if b["seed"] == seed]
                ax.scatter(xs, ys, s=14, label=f"seed {seed}")
                curve = a.curves.get((corpus, seed))
                if curve is not None:
                    grid = np.linspace(curve.x[0], curve.x[-1], 200)
                    ax.plot(grid, [curve.loss_at(float(np.expm1(g))) for g in grid], lw=1)
            for r in a.rows:
                if r.corpus == corpus and r.name == "single" and r.leakage is not None:
                    ax.axhline(r.values["forget_loss"] or 0, color="k", lw=0.4, ls=":")
            ax.set_xlabel("log(1 + forget tokens trained on)")
            ax.set_ylabel("held-out forget loss (nats)")
            ax.set_title(f"baseline curve, {corpus} (dotted: single, ablated)")
            ax.legend(fontsize=7)

    return _figure_png(draw, (5.5 * len(corpora), 4))


def plot_pareto(a: Analysis) -> bytes:
    corpora = _corpora(a)
    colors = _colors(_names(a))

    def draw(fig: Any) -> None:
        for i, corpus in enumerate(corpora):
            ax = fig.add_subplot(1, len(corpora), i + 1)
            groups: dict[str, list[RunRow]] = defaultdict(list)
            for r in a.rows:
                if r.corpus == corpus:
                    groups[r.name].append(r)
            for name, members in groups.items():
                xs = [r.values["forget_loss"] for r in members]
                ys = [r.values["retain_loss"] for r in members]
                ax.scatter(xs, ys, s=8, color=colors[name], alpha=0.35)
                ax.scatter(np.mean(xs), np.mean(ys), s=40, color=colors[name], label=name)
            by_n: dict[int, list[dict[str, Any]]] = defaultdict(list)
            for b in a.baseline:
                if b["corpus"] == corpus and b["forget_loss"] is not None:
                    by_n[b["forget_tokens"]].append(b)
            order = sorted(by_n, key=lambda n: np.mean([b["exposure"] for b in by_n[n]]))
            ax.plot(
                [np.mean([b["forget_loss"] for b in by_n[n]]) for n in order],
                [np.mean([b["retain_loss"] for b in by_n[n]]) for n in order],
                "k.-",
                lw=0.8,
                label="baseline curve",
            )
            ax.set_xlabel("forget loss, deployed (higher = more removed)")
            ax.set_ylabel("retain loss, deployed (lower = better)")
            ax.set_title(f"retain vs forget, {corpus}")
            ax.legend(fontsize=6, ncol=2)

    return _figure_png(draw, (6 * len(corpora), 4.5))


def plot_leakage_vs_share(a: Analysis) -> bytes:
    corpora = _corpora(a)
    names = _names(a)
    colors = _colors(names)

    def draw(fig: Any) -> None:
        for i, corpus in enumerate(corpora):
            ax = fig.add_subplot(1, len(corpora), i + 1)
            for j, name in enumerate(names):
                entries = [s for s in a.summary if s["name"] == name and s["corpus"] == corpus]
                entries.sort(key=lambda s: s["recall"])
                xs, ys, lo, hi = [], [], [], []
                for s in entries:
                    iv = interval_of(s["leakage"])
                    if iv.mean is None:
                        continue
                    xs.append(1 - s["recall"] + (j - len(names) / 2) * 0.004)
                    ys.append(iv.mean)
                    lo.append(iv.mean - (iv.lo if iv.lo is not None else iv.mean))
                    hi.append((iv.hi if iv.hi is not None else iv.mean) - iv.mean)
                if xs:
                    ax.errorbar(
                        xs,
                        ys,
                        yerr=[lo, hi],
                        fmt="o-",
                        ms=3,
                        lw=0.8,
                        capsize=2,
                        color=colors[name],
                        label=name,
                    )
            ax.axhline(1.0, color="k", lw=0.5, ls="--")
            ax.set_xlabel("undiscovered share of forget data (1 - recall)")
            ax.set_ylabel("leakage (mean, 95% CI)")
            ax.set_title(f"leakage, {corpus} (dashed: filtering = 1)")
            ax.legend(fontsize=6, ncol=2)

    return _figure_png(draw, (6 * len(corpora), 4.5))


def _mean_matrices(a: Analysis) -> dict[str, tuple[list[str], list[str], np.ndarray]]:
    """Mean loss-increase matrix (rows: retain and forget modes) per variant, hack corpus."""
    out = {}
    for name in _names(a):
        runs, row_names, experts = [], [], None
        for r in a.rows:
            if r.name != name or r.corpus != "hacks":
                continue
            ablation = (r.record["result"]["metrics"].get("specialization") or {}).get("ablation")
            if not ablation or len(ablation.get("experts", [])) < 2:
                continue
            experts = ablation["experts"]
            runs.append(ablation["increase"])
            row_names += [row for row in ablation["rows"] if row not in row_names]
        if runs and experts:
            m = np.full((len(runs), len(row_names), len(experts)), np.nan)
            for i, inc in enumerate(runs):
                for j, row in enumerate(row_names):
                    if row in inc:
                        m[i, j] = inc[row]
            out[name] = (row_names, experts, np.nanmean(m, axis=0))
    return out


def plot_heatmaps(a: Analysis) -> bytes | None:
    mats = _mean_matrices(a)
    if not mats:
        return None

    def draw(fig: Any) -> None:
        n = len(mats)
        cols = min(n, 3)
        rows = (n + cols - 1) // cols
        for i, (name, (row_names, experts, m)) in enumerate(mats.items()):
            ax = fig.add_subplot(rows, cols, i + 1)
            im = ax.imshow(m, aspect="auto", cmap="magma")
            ax.set_xticks(range(len(experts)), experts, fontsize=7)
            ax.set_yticks(range(len(row_names)), row_names, fontsize=7)
            ax.set_title(f"{name}: loss increase, one expert ablated", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)

    n = len(mats)
    return _figure_png(draw, (5.2 * min(n, 3), 3.2 * ((n + 2) // 3)))


def plot_gradnorms(a: Analysis) -> bytes:
    names = _names(a)
    keys = [
        ("quarantine", "forget_unlabeled"),
        ("quarantine", "retain_unlabeled"),
        ("shared", "forget_unlabeled"),
        ("shared", "retain_unlabeled"),
    ]

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        width = 0.2
        for k, (group, data) in enumerate(keys):
            means = []
            for name in names:
                vals = [
                    (r.record["result"].get("gradnorms") or {}).get(group, {}).get(data)
                    for r in a.rows
                    if r.name == name
                ]
                vals = [v for v in vals if v is not None]
                means.append(np.mean(vals) if vals else 0.0)
            ax.bar(
                np.arange(len(names)) + (k - 1.5) * width,
                means,
                width,
                label=f"{group} params, {data.replace('_', ' ')}",
            )
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("gradient RMS per parameter")
        ax.set_yscale("log")
        ax.set_title("gradient norms by group on the trained model (SGTM §4.4)")
        ax.legend(fontsize=7)

    return _figure_png(draw, (max(7, 0.7 * len(names) + 3), 4.5))


def plot_training(a: Analysis) -> bytes:
    corpora = sorted({r.corpus for r in a.rows})
    colors = _colors(_names(a))

    def draw(fig: Any) -> None:
        for i, corpus in enumerate(corpora):
            ax = fig.add_subplot(1, len(corpora), i + 1)
            for name in _names(a):
                logs = [
                    r.record["result"].get("log") or []
                    for r in a.rows
                    if r.name == name and r.corpus == corpus
                ]
                logs = [lg for lg in logs if lg]
                if not logs:
                    continue
                n = min(len(lg) for lg in logs)
                steps = [p[0] for p in logs[0][:n]]
                mean = np.mean([[p[1] for p in lg[:n]] for lg in logs], axis=0)
                ax.plot(steps, mean, lw=0.9, color=colors[name], label=name)
            ax.set_xlabel("step")
            ax.set_ylabel("training loss (mean over runs)")
            ax.set_title(f"training curves, {corpus}")
            ax.legend(fontsize=6, ncol=2)

    return _figure_png(draw, (6 * max(1, len(corpora)), 4.2))


# -- content ---------------------------------------------------------------------------


def _claim_effect(claim: dict[str, Any]) -> str:
    parts = []
    for v in claim["variants"]:
        if "interval" not in v:
            parts.append(f"{v['variant']}: {v.get('reason', 'n/a')}")
        elif claim["rule"] == "threshold":
            parts.append(f"{v['variant']}: {_iv(v['interval'])}")
        else:
            parts.append(f"{v['variant']}: {_signed(v['interval'])}")
    return "; ".join(parts)


def _headline_effect(row: dict[str, Any]) -> str:
    return _claim_effect(row["claims"][0]) if row["claims"] else "n/a"


def _further_claims(row: dict[str, Any]) -> str:
    return "; ".join(
        f"{c['claim']} ({c['metric_label']}"
        + (f" vs {c['reference']}" if c["reference"] else "")
        + f"): {_verdict_mark(c['verdict'])}, {_claim_effect(c)}"
        for c in row["claims"][1:]
    )


def verdict_table(a: Analysis) -> tuple[list[str], list[list[str]]]:
    header = [
        "#",
        "mechanism",
        "note",
        "variants",
        "claim tested",
        "effect (mean [95% CI])",
        "verdict",
        "further claims",
    ]
    rows = []
    for row in a.verdicts:
        claim = row["claims"][0] if row["claims"] else None
        metric = claim["metric_label"] if claim else ""
        ref = f" vs {claim['reference']}" if claim and claim["reference"] else ""
        rows.append(
            [
                str(row["row"]),
                row["mechanism"],
                row["note_verdict"],
                ", ".join(row["variants"]),
                (claim["claim"] + f" ({metric}{ref})") if claim else "",
                _headline_effect(row),
                _verdict_mark(row["verdict"]),
                _further_claims(row),
            ]
        )
    return header, rows


def _content(a: Analysis, source: str, plots: dict[str, bytes | None]) -> list[Block]:
    spec = a.spec
    conf = spec.verdict.confidence
    blocks: list[Block] = []
    n_done = a.n_runs
    blocks.append(
        (
            "p",
            f"Study **{spec.study.name}** ({source}; id {spec.study_id}). "
            f"{n_done} runs analysed, {len(a.missing)} missing. "
            f"Generated {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}. "
            f"{spec.study.description}",
        )
    )
    blocks.append(("h2", "Verdicts: MISSION.md's table, rows 1-7"))
    header, rows = verdict_table(a)
    blocks.append(("table", (header, rows)))
    blocks.append(
        (
            "p",
            "Effects are differences against the reference (variant minus reference), "
            "paired by corpus, seed and recall. Leakage: lower is better; a claim that a "
            "mechanism *raises* leakage (rows 6, 7) is supported by a positive interval.",
        )
    )
    blocks.append(("h2", "Rules"))
    rules = [
        "**Leakage**: " + _leakage_definition(spec),
        "**Paired rule**: " + RULES["paired"].format(conf=conf),
        "**Threshold rule**: "
        + RULES["threshold"].format(
            conf=conf, sup=spec.verdict.nmi_supported, ref=spec.verdict.nmi_refuted
        ),
        "**Rows**: " + RULES["row"],
        "**Metrics**: expert-load CV is that of the backward router's load for routed "
        "variants and of the soft gate's mean weight per expert on held-out forget tokens "
        "for gate variants; router logit scale is the std of the gate's logits; relearning "
        f"is capped at {spec.measure.relearn_steps} steps (a capped run counts as the cap).",
    ]
    for text in rules:
        blocks.append(("p", text))
    blocks.append(("h2", "Every claim"))
    claim_rows = []
    for row in a.verdicts:
        for claim in row["claims"]:
            for v in claim["variants"]:
                interval = v.get("interval")
                shown = (
                    "n/a"
                    if interval is None
                    else _iv(interval)
                    if claim["rule"] == "threshold"
                    else _signed(interval)
                )
                claim_rows.append(
                    [
                        str(row["row"]),
                        claim["claim"],
                        v["variant"],
                        claim["metric_label"]
                        + (f" vs {claim['reference']}" if claim["reference"] else ""),
                        shown,
                        str(v.get("censored_pairs", "")),
                        _verdict_mark(v["verdict"])
                        + (f" ({v['reason']})" if "reason" in v else ""),
                    ]
                )
    blocks.append(
        (
            "table",
            (
                ["#", "claim", "variant", "metric", "mean [CI]", "bounded pairs", "verdict"],
                claim_rows,
            ),
        )
    )
    blocks.append(("h2", "Effects against single (no verdict)"))
    eff_rows = []
    for row in a.verdicts:
        for e in row["effects"]:
            eff_rows.append(
                [
                    str(row["row"]),
                    e["variant"],
                    METRICS[e["metric"]][0],
                    _signed(e["interval"]),
                    str(e["censored_pairs"]),
                ]
            )
    for ref in a.references:
        for e in ref["effects"]:
            eff_rows.append(
                [
                    "ref",
                    ref["name"],
                    METRICS[e["metric"]][0],
                    _signed(e["interval"]),
                    str(e["censored_pairs"]),
                ]
            )
    blocks.append(
        ("table", (["#", "variant", "metric", "difference [CI]", "bounded pairs"], eff_rows))
    )
    blocks.append(("h2", "Reference rows: does SGTM beat filtering and no routing?"))
    sep_rows = []
    for s in a.separation:
        sep_rows.append(
            [
                s["corpus"],
                f"{s['recall']:g}",
                _iv(s["single"]),
                _iv(s["filter"]),
                _iv(s["none"]),
                _yes_no(s["separated_from_filter"]),
                _yes_no(s["separated_from_none"]),
            ]
        )
    blocks.append(
        (
            "table",
            (
                [
                    "corpus",
                    "recall",
                    "single leakage",
                    "filter leakage",
                    "none leakage",
                    "single < filter",
                    "single < none",
                ],
                sep_rows,
            ),
        )
    )
    blocks.append(("p", "Separated = the intervals do not overlap (single's lies below)."))
    blocks.append(("h2", "All variants"))
    sum_rows = []
    for s in a.summary:
        sum_rows.append(
            [
                s["name"],
                "" if s["row"] is None else str(s["row"]),
                s["corpus"],
                f"{s['recall']:g}",
                str(len(s["seeds"])),
                _params(s.get("parameters") or {}),
                _iv(s["leakage"]) + (f" ({s['bounds']})" if s["bounds"] else ""),
                _iv(s["retain_cost"]),
                _iv(s["forget_loss"], 2),
                _iv(s["relearn_steps"], 1),
                _iv(s["balance_cv"], 2),
                _iv(s["nmi"], 2),
                _iv(s["logit_scale"], 2),
                _iv(s["gn_ratio"], 2),
            ]
        )
    blocks.append(
        (
            "table",
            (
                [
                    "variant",
                    "row",
                    "corpus",
                    "recall",
                    "seeds",
                    "params quarantine / shared",
                    "leakage",
                    "retain cost",
                    "forget loss",
                    "relearn steps",
                    "load CV",
                    "NMI",
                    "logit scale",
                    "grad ratio q f/r",
                ],
                sum_rows,
            ),
        )
    )
    blocks.append(
        (
            "p",
            "Bounds in the leakage column: `<` some runs' forget loss lay above the "
            "baseline curve's start, `>` below its end; their value is the curve's edge.",
        )
    )
    blocks.append(("h2", "Baseline curves"))
    base_rows = [
        [
            b["corpus"],
            str(b["seed"]),
            str(b["forget_tokens"]),
            f"{b['exposure']:.0f}",
            "n/a" if b["forget_loss"] is None else f"{b['forget_loss']:.3f}",
            "n/a" if b["retain_loss"] is None else f"{b['retain_loss']:.3f}",
        ]
        for b in sorted(a.baseline, key=lambda b: (b["corpus"], b["seed"], b["exposure"]))
    ]
    blocks.append(
        (
            "table",
            (
                [
                    "corpus",
                    "seed",
                    "forget_token_budget",
                    "forget tokens trained on",
                    "forget loss",
                    "retain loss",
                ],
                base_rows,
            ),
        )
    )
    titles = {
        "curves": "Baseline curves (points per seed, fitted monotone curve)",
        "pareto": "Retain vs forget loss (Pareto view)",
        "leakage": "Leakage vs undiscovered share",
        "heatmaps": "Mode x expert: loss increase when one expert is ablated (hack corpus)",
        "gradnorms": "Gradient norms by group",
        "training": "Training curves",
    }
    blocks.append(("h2", "Plots"))
    for name, title in titles.items():
        blocks.append(("h3", title))
        if plots.get(name) is None:
            blocks.append(
                (
                    "p",
                    "No data for this plot in this study (e.g. no hack-corpus runs "
                    "with several experts).",
                )
            )
        else:
            blocks.append(("img", (name, title)))
    if a.missing or a.notes:
        blocks.append(("h2", "Missing runs and notes"))
        for note in a.notes:
            blocks.append(("p", note))
        if a.missing:
            blocks.append(("pre", "\n".join(a.missing)))
    return blocks


def _params(counts: dict[str, int]) -> str:
    if not counts:
        return "n/a"
    return f"{counts.get('quarantine', 0):,} / {counts.get('shared', 0):,}"


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "NO")


def _leakage_definition(spec: Any) -> str:
    curve = (
        "one curve per corpus and seed"
        if spec.measure.curve == "seed"
        else "one curve per corpus pooled over seeds"
    )
    return (
        "standard models (train.method=none, the same testbed as `single`) trained on all "
        "retain data plus n forget tokens give the baseline curve of held-out forget loss "
        f"(no ablation) against log(1 + forget tokens trained on), {curve}, made monotone "
        f"by isotonic regression and interpolated ({spec.measure.interpolation}). A grid "
        "run's deployed forget loss on held-out undiscovered data (after ablation for "
        "routed methods, as trained for none/filter) is mapped onto the curve of its corpus "
        "and seed; leakage = equivalent forget tokens / undiscovered forget tokens the run "
        "trained on. Tokens are counted as trained on (exposure, exact from the batch "
        "order). Outside the curve the value is a bound (`<` or `>`), never extrapolated. "
        "Retain cost = deployed retain loss minus the retain loss of the n = 0 run (the "
        "retain-only oracle) of the same corpus and seed."
    )


# -- rendering -------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], title: str) -> str:
    lines = [f"# {title}", ""]
    for kind, content in blocks:
        if kind in ("h2", "h3"):
            lines += [("## " if kind == "h2" else "### ") + content, ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "pre":
            lines += ["```", content, "```", ""]
        elif kind == "table":
            header, rows = content
            lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            name, alt = content
            lines += [f"![{alt}](plots/{name}.png)", ""]
    return "\n".join(lines)


def _inline_md(text: str) -> str:
    """Escape, then render **bold** and `code` (the only inline markup used)."""
    out = html.escape(text)
    parts = out.split("**")
    out = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = out.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f2f2f2} tr:nth-child(even){background:#fafafa}
img{max-width:100%} code{background:#f4f4f4;padding:0 3px}
.supported{color:#176117;font-weight:bold}.REFUTED{color:#a11;font-weight:bold}
.inconclusive{color:#777}
"""


def render_html(blocks: list[Block], title: str, plots: dict[str, bytes | None]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for kind, content in blocks:
        if kind in ("h2", "h3"):
            body.append(f"<{kind}>{html.escape(content)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_md(content)}</p>")
        elif kind == "pre":
            body.append(f"<pre>{html.escape(content)}</pre>")
        elif kind == "table":
            header, rows = content
            ths = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            cells = [f"<table><tr>{ths}</tr>"]
            for row in rows:
                tds = []
                for c in row:
                    cls = (
                        c.split(" ")[0]
                        if c.split(" ")[0] in ("supported", "REFUTED", "inconclusive")
                        else ""
                    )
                    attr = f' class="{cls}"' if cls else ""
                    tds.append(f"<td{attr}>{html.escape(str(c))}</td>")
                cells.append("<tr>" + "".join(tds) + "</tr>")
            body.append("\n".join(cells) + "</table>")
        elif kind == "img":
            name, alt = content
            data = plots.get(name)
            if data:
                b64 = base64.b64encode(data).decode("ascii")
                body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">')
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def verdicts_json(a: Analysis, source: str) -> dict[str, Any]:
    spec = a.spec
    conf = spec.verdict.confidence
    return {
        "study": spec.study.name,
        "study_id": spec.study_id,
        "source": source,
        "confidence": conf,
        "rules": {
            "leakage": _leakage_definition(spec),
            "paired": RULES["paired"].format(conf=conf),
            "threshold": RULES["threshold"].format(
                conf=conf, sup=spec.verdict.nmi_supported, ref=spec.verdict.nmi_refuted
            ),
            "row": RULES["row"],
        },
        "table": {
            str(k): {"mechanism": v[0], "note": v[1], "review": v[2]} for k, v in TABLE.items()
        },
        "rows": a.verdicts,
        "references": a.references,
        "separation": a.separation,
        "summary": a.summary,
        "baseline": a.baseline,
        "curves": {f"{k[0]}/{k[1]}": c.to_dict() for k, c in a.curves.items()},
        "missing_runs": a.missing,
        "notes": a.notes,
        "claims_defined": [c.text for c in CLAIMS],
    }


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_report(a: Analysis, out: str | Path, source: str = "") -> dict[str, Path]:
    """Write ``report.html``, ``report.md``, ``verdicts.json`` and ``plots/*.png``."""
    out = Path(out)
    plots: dict[str, bytes | None] = {}
    if a.rows or a.baseline:
        plots = {
            "curves": plot_curves(a) if a.baseline else None,
            "pareto": plot_pareto(a) if a.rows else None,
            "leakage": plot_leakage_vs_share(a) if a.rows else None,
            "heatmaps": plot_heatmaps(a),
            "gradnorms": plot_gradnorms(a) if a.rows else None,
            "training": plot_training(a) if a.rows else None,
        }
    plot_dir = out / "plots"
    for name, data in plots.items():
        if data is not None:
            _write_atomic(plot_dir / f"{name}.png", data)
    blocks = _content(a, source, plots)
    title = f"evil_moe absorption study: {a.spec.study.name}"
    md = render_markdown(blocks, title)
    page = render_html(blocks, title, plots)
    _write_atomic(out / "report.md", md.encode("utf-8"))
    _write_atomic(out / "report.html", page.encode("utf-8"))
    payload = json.dumps(_finite(verdicts_json(a, source)), indent=1, default=str, allow_nan=False)
    _write_atomic(out / "verdicts.json", (payload + "\n").encode("utf-8"))
    return {"html": out / "report.html", "md": out / "report.md", "json": out / "verdicts.json"}

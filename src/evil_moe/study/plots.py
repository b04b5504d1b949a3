"""The study report's figures, each a PNG (bytes) drawn with matplotlib's Agg backend."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from evil_moe.study.analysis import Analysis, RunRow


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


def _names(rows: list[RunRow]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r.name not in seen:
            seen.append(r.name)
    return seen


def _blocks(a: Analysis) -> list[str]:
    return [b.name for b in a.spec.grid if any(r.run.block == b.name for r in a.rows)]


def plot_curves(a: Analysis) -> bytes | None:
    """Baseline curves with the mean deployed forget loss of every arm of the corpus."""
    corpora = sorted({b["corpus"] for b in a.baseline})
    if not corpora:
        return None

    def draw(fig: Any) -> None:
        for i, corpus in enumerate(corpora):
            ax = fig.add_subplot(1, len(corpora), i + 1)
            pts = [b for b in a.baseline if b["corpus"] == corpus and b["forget_loss"] is not None]
            ax.scatter(
                [np.log1p(b["exposure"]) for b in pts],
                [b["forget_loss"] for b in pts],
                s=12,
                c="k",
                label="curve runs",
            )
            for key, curve in a.curves.items():
                if key.split("/")[0] == corpus:
                    grid = np.linspace(curve.x[0], curve.x[-1], 200)
                    ax.plot(grid, [curve.loss_at(float(np.expm1(g))) for g in grid], lw=1)
            means: dict[str, list[float]] = defaultdict(list)
            for r in a.rows:
                if r.run.corpus == corpus and r.values["forget_loss"] is not None:
                    means[r.name].append(r.values["forget_loss"])
            cmap = _cmap()
            for j, (name, vals) in enumerate(sorted(means.items())):
                ax.axhline(float(np.mean(vals)), color=cmap(j % 20), lw=0.8, ls=":", label=name)
            ax.set_xlabel("log(1 + forget tokens trained on)")
            ax.set_ylabel("held-out forget loss (nats)")
            ax.set_title(f"baseline curve, {corpus} (dotted: arms, deployed)")
            _legend(ax)

    return _figure_png(draw, (7 * len(corpora), 5))


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, ncol=2)


def _cmap() -> Any:
    import matplotlib

    return matplotlib.colormaps["tab20"]


def plot_arms(a: Analysis, metric: str, label: str, log: bool = False) -> bytes | None:
    """Mean and 95% interval of ``metric`` per arm, one panel per grid block."""
    blocks = [
        b
        for b in _blocks(a)
        if any(r.values.get(metric) is not None for r in a.rows if r.run.block == b)
    ]
    if not blocks:
        return None

    def draw(fig: Any) -> None:
        for i, block in enumerate(blocks):
            ax = fig.add_subplot(1, len(blocks), i + 1)
            entries = [
                s for s in a.summary if s["block"] == block and s[metric]["mean"] is not None
            ]
            labels = []
            for j, s in enumerate(entries):
                iv = s[metric]
                lo, hi = iv["lo"] if iv["lo"] is not None else iv["mean"], iv["hi"]
                hi = hi if hi is not None else iv["mean"]
                ax.errorbar(
                    [iv["mean"]], [j], xerr=[[iv["mean"] - lo], [hi - iv["mean"]]], fmt="o", ms=4
                )
                sweep = " ".join(f"{v}" for v in s["sweep"].values())
                labels.append(f"{s['name']} {s['corpus']} r={s['recall']} {sweep}".strip())
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            if log:
                ax.set_xscale("symlog", linthresh=1e-3)
            ax.set_xlabel(label)
            ax.set_title(f"block {block}")

    height = 1.2 + 0.25 * max(len([s for s in a.summary if s["block"] == b]) for b in blocks)
    return _figure_png(draw, (6 * len(blocks), height))


def plot_effects(a: Analysis) -> bytes | None:
    """Each claim's effect in the claimed direction, in units of its minimum effect."""
    tested = [c for c in a.claims if "test" in c and c["test"]["effect"]["mean"] is not None]
    if not tested:
        return None

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        colors = {"supported": "tab:green", "refuted": "tab:red", "inconclusive": "tab:gray"}
        for j, c in enumerate(tested):
            e, d = c["test"]["effect"], c["delta"] or 1.0
            lo = e["lo"] if e["lo"] is not None else e["mean"]
            hi = e["hi"] if e["hi"] is not None else e["mean"]
            ax.errorbar(
                [e["mean"] / d],
                [j],
                xerr=[[(e["mean"] - lo) / d], [(hi - e["mean"]) / d]],
                fmt="o",
                color=colors[c["verdict"]],
            )
        ax.axvline(0, color="k", lw=0.8)
        ax.axvline(1, color="k", lw=0.8, ls="--")
        ax.set_yticks(
            range(len(tested)),
            [f"{c['id']} {c['variant']} vs {c['reference']}" for c in tested],
            fontsize=7,
        )
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlabel("effect in the claimed direction / minimum effect (0: none; 1: delta)")
        ax.invert_yaxis()

    return _figure_png(draw, (8, 1.2 + 0.3 * len(tested)))


def plot_heatmaps(a: Analysis) -> bytes | None:
    """Mean mode x (layer, expert) loss increase under mean ablation, per K>1 variant."""
    mats: dict[str, tuple[list[str], list[str], list[np.ndarray]]] = {}
    for r in a.rows:
        abl = (r.record["result"]["metrics"].get("specialization") or {}).get("ablation") or {}
        if len(abl.get("rows", [])) < 3 or len(abl.get("units", [])) < 2:
            continue
        rows = [n for n in abl["rows"] if n != "retain"]
        m = np.array([abl["increase"][n] for n in rows])
        entry = mats.setdefault(f"{r.name} ({r.run.block})", (rows, abl["units"], []))
        if entry[0] == rows and entry[1] == abl["units"]:
            entry[2].append(m)
    if not mats:
        return None

    def draw(fig: Any) -> None:
        for i, (name, (rows, units, ms)) in enumerate(mats.items()):
            ax = fig.add_subplot(1, len(mats), i + 1)
            mean = np.mean(ms, axis=0)
            im = ax.imshow(mean, aspect="auto", cmap="viridis")
            ax.set_yticks(range(len(rows)), rows, fontsize=7)
            ax.set_xticks(
                range(len(units)),
                [u.replace("blocks.", "L").replace(".mlp.experts.", ".") for u in units],
                fontsize=6,
                rotation=90,
            )
            ax.set_title(f"{name}, n={len(ms)}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046)

    return _figure_png(draw, (3.6 * len(mats), 3.6))


def plot_training(a: Analysis) -> bytes | None:
    """Training loss curves (mean over seeds) per arm, one panel per block."""
    blocks = _blocks(a)
    if not blocks:
        return None

    def draw(fig: Any) -> None:
        for i, block in enumerate(blocks):
            ax = fig.add_subplot(1, len(blocks), i + 1)
            curves: dict[str, list[list[list[float]]]] = defaultdict(list)
            for r in a.rows:
                if r.run.block == block and r.record["result"].get("log"):
                    sweep = " ".join(f"{v}" for v in r.run.sweep.values())
                    curves[f"{r.name} {sweep}".strip()].append(r.record["result"]["log"])
            for name, logs in sorted(curves.items()):
                n = min(len(log) for log in logs)
                steps = [p[0] for p in logs[0][:n]]
                ax.plot(
                    steps,
                    np.mean([[p[1] for p in log[:n]] for log in logs], axis=0),
                    lw=0.8,
                    label=name,
                )
            ax.set_xlabel("step")
            ax.set_ylabel("training loss")
            ax.set_title(f"block {block}")
            _legend(ax)

    return _figure_png(draw, (6 * len(blocks), 4))


def plot_after_ablation(a: Analysis) -> bytes | None:
    """Held-out forget loss while fine-tuning the ablated model: on forget data
    (relearning) and on retain data only."""
    rel: dict[str, list[list[float]]] = defaultdict(list)
    ret: dict[str, list[list[float]]] = defaultdict(list)
    for r in a.rows:
        res = r.record["result"]
        if res.get("relearning"):
            rel[r.name].append([p[1] for p in res["relearning"]])
        if res.get("retain_finetune"):
            ret[r.name].append([p[1] for p in res["retain_finetune"]["forget"]])
    if not rel:
        return None

    def draw(fig: Any) -> None:
        for i, (title, data) in enumerate(
            (("relearning on forget data", rel), ("fine-tuning on retain data", ret))
        ):
            ax = fig.add_subplot(1, 2, i + 1)
            for name, curves in sorted(data.items()):
                n = min(len(c) for c in curves)
                ax.plot(np.mean([c[:n] for c in curves], axis=0), lw=0.8, label=name)
            ax.set_xlabel("evaluation")
            ax.set_ylabel("held-out forget loss (nats)")
            ax.set_title(title)
            _legend(ax)

    return _figure_png(draw, (12, 4))


def all_plots(a: Analysis) -> dict[str, bytes | None]:
    """Every figure of the report by name (``None`` where the study has nothing to show)."""
    return {
        "curves": plot_curves(a),
        "effects": plot_effects(a),
        "leakage": plot_arms(a, "leakage", "leakage (symlog)", log=True),
        "forget_loss": plot_arms(a, "forget_loss", "deployed forget loss, undiscovered (nats)"),
        "heatmaps": plot_heatmaps(a),
        "training": plot_training(a),
        "after_ablation": plot_after_ablation(a),
    }

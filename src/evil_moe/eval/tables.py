"""Plain-text tables of run metrics, for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LOSS_ROWS = ("retain", "forget_labeled", "forget_undiscovered")


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned first column, right-aligned others; floats with 3 decimals."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "" if v is None else str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = [
        "  ".join(
            str(h).ljust(w) if i == 0 else str(h).rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append(
            "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w)
                for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def loss_table(metrics: dict[str, Any]) -> str:
    """Held-out loss per category before and after ablation, and the increase."""
    rows = []
    for cat in LOSS_ROWS:
        entry = metrics["loss"].get(cat)
        if not entry:
            continue
        rows.append([cat, entry["trained"], entry["ablated"], entry["ablated"] - entry["trained"]])
    title = f"method={metrics['method']}  held-out mean token cross-entropy (nats)"
    return title + "\n" + format_table(["category", "trained", "ablated", "increase"], rows)

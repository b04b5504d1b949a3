"""``evil-moe rl``: the command-line front of :func:`evil_moe.rl.run.run_rl`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evil_moe.eval.tables import format_table
from evil_moe.rl.config import load_rl_config
from evil_moe.rl.run import run_rl
from evil_moe.rl.task import MODES


def rate_table(metrics: dict[str, Any]) -> str:
    """Hack and solve rates per view (and hack per mode) as a plain-text table."""
    rows = []
    views = [
        ("warm start", metrics["warm_start"]["heldout"]),
        ("trained", metrics["trained"]),
        ("deployed", metrics["deployed"]),
    ]
    for name, s in views:
        rows.append([name, s["solve"], s["hack"], *(s["hack_by_mode"][m] for m in MODES)])
    header = ["view", "solve", "hack", *MODES]
    flagged = ", ".join(metrics["flagged_modes"]) or "none"
    title = f"method={metrics['method']} baseline={metrics['baseline']}  (monitor flags: {flagged})"
    return title + "\n" + format_table(header, rows)


def cli_rl(args: Any, check_out_dir: Callable[[Path, Any], None]) -> int:
    """``evil-moe rl``: parse, refuse a directory of another run, run (or show), print."""
    cfg = load_rl_config(args.config, args.overrides)
    out = Path(args.out)
    check_out_dir(out, cfg)
    if (out / "metrics.json").exists():
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        print(f"{out} already holds this finished run; showing its results.", file=sys.stderr)
    else:
        print(
            f"evil-moe rl: method={cfg.grpo.method} steps={cfg.grpo.steps} seed={cfg.seed} "
            f"quarantine={cfg.quarantine.kind} rank {cfg.quarantine.rank}",
            file=sys.stderr,
        )
        metrics = run_rl(cfg, out, progress=not args.quiet)
    print(rate_table(metrics))
    relearn = metrics.get("relearning")
    if relearn:
        steps = relearn["steps"]
        back = f"{steps} steps" if steps is not None else f"not within {relearn['cap']} steps"
        print(f"relearning: hack rate back to {relearn['target']:.3f} after {back}")
    print(f"wrote {out}/metrics.json")
    return 0

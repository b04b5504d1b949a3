"""GRPO on the offline hackable task: no intervention, the reward penalty, and SGTM routing.

    python examples/grpo_reward_hacks.py [--out runs/grpo-example] [--seed 0] [key=value ...]

One warm start (SFT on mostly honest demonstrations, a few hacks) is shared by three GRPO
runs of ``evil-moe rl``'s default config; each is evaluated on held-out tasks as trained
and deployed (quarantine ablated). About 10 minutes on a 2-core CPU; the run directories
are resumable. The monitor flags hacks of some modes with recall 0.5 and never flags
``always_equal``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evil_moe.eval.tables import format_table
from evil_moe.rl.config import load_rl_config
from evil_moe.rl.run import run_rl
from evil_moe.rl.task import MODES

METHODS = ("none", "penalty", "sgtm")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/grpo-example")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="evil-moe rl config overrides")
    args = p.parse_args()
    out = Path(args.out)
    rows = []
    warm = None
    for method in METHODS:
        cfg = load_rl_config(
            None,
            [
                *args.overrides,
                f"grpo.method={method}",
                f"seed={args.seed}",
                f"warmstart_cache={out / 'warmstarts'}",
                "eval.relearn_steps=0",
            ],
        )
        metrics = run_rl(cfg, out / method)
        warm = metrics["warm_start"]["heldout"]
        for view in ("trained", "deployed"):
            s = metrics[view]
            rows.append(
                [f"{method} {view}", s["solve"], s["hack"], *(s["hack_by_mode"][m] for m in MODES)]
            )
    assert warm is not None
    rows.insert(
        0, ["warm start", warm["solve"], warm["hack"], *(warm["hack_by_mode"][m] for m in MODES)]
    )
    print(format_table(["policy", "solve", "hack", *MODES], rows))


if __name__ == "__main__":
    main()

"""The RL study: every method and mechanism of issue 13 on ``evil-moe rl``, several seeds.

    python bench/rl_study.py --out runs/rl-study --seeds 0 1 2 --jobs 2 [key=value ...]

Arms (each a run of :func:`evil_moe.rl.run.run_rl` on the default config plus overrides):
``none``, ``penalty``, ``filter``, ``sgtm``, ``gradient_routing`` (recall 0.5 on the
flagged modes, one mode never flagged), and the mechanisms, each with its own control:
``sgtm_amplify`` (vs ``sgtm``), ``sgtm_baseline_all`` (vs ``sgtm``), ``sgtm_qlr10`` (the
quarantine at 10x the learning rate) vs ``none_qlr10`` (the same quarantine, no
routing); and a positive control with a perfect monitor on the flagged modes,
``sgtm_recall1`` vs ``penalty_recall1``; and the amplifier without any flag
(``sgtm_amplify_recall0``, recall 0) as the amplifier's own control. All arms of a seed share one warm start
(``warmstart_cache``).

Resumable: finished runs (``runs/<arm>-s<seed>/metrics.json``) are skipped, killed ones
resume from their checkpoint. ``--relearn-only`` recomputes the relearning measurement
of every finished run from its saved weights (``relearning.json``, preferred by the
report). The report (``report.md`` + ``report.json``: means and
95% t-intervals over seeds, seed-paired contrasts) is rewritten at the end;
``--report-only`` rebuilds it from the finished runs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ARMS: dict[str, list[str]] = {
    "none": ["grpo.method=none"],
    "penalty": ["grpo.method=penalty"],
    "filter": ["grpo.method=filter"],
    "sgtm": ["grpo.method=sgtm"],
    "gradient_routing": ["grpo.method=gradient_routing"],
    "sgtm_amplify": ["grpo.method=sgtm", "quarantine.amplify=true"],
    "sgtm_baseline_all": ["grpo.method=sgtm", "grpo.baseline=all"],
    "sgtm_qlr10": ["grpo.method=sgtm", "quarantine.lr_multiplier=10"],
    "none_qlr10": ["grpo.method=none", "quarantine.lr_multiplier=10"],
    # positive control: a perfect monitor on the flagged modes (always_equal still unflagged)
    "sgtm_recall1": ["grpo.method=sgtm", "monitor.recall=1.0"],
    # the amplifier with no flags at all: does it absorb hacking without the monitor?
    "sgtm_amplify_recall0": ["grpo.method=sgtm", "quarantine.amplify=true", "monitor.recall=0.0"],
    "penalty_recall1": ["grpo.method=penalty", "monitor.recall=1.0"],
}
#: (treatment, control, what the contrast isolates)
CONTRASTS = [
    ("sgtm", "none", "routing vs no intervention"),
    ("sgtm", "penalty", "routing vs the reward penalty"),
    ("gradient_routing", "penalty", "gradient routing vs the reward penalty"),
    ("filter", "penalty", "filtering vs the reward penalty"),
    ("sgtm_amplify", "sgtm", "absorption amplifier"),
    ("sgtm_amplify", "sgtm_amplify_recall0", "the monitor's flags, under the amplifier"),
    ("sgtm_baseline_all", "sgtm", "flagged completions in the unflagged baseline"),
    (
        "sgtm_qlr10",
        "none_qlr10",
        "routing into a 10x-lr quarantine vs the same quarantine unrouted",
    ),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--relearn-only",
        action="store_true",
        help="recompute relearning of every finished run into runs/<arm>-s<seed>/relearning.json",
    )
    p.add_argument("overrides", nargs="*", help="config overrides applied to every arm")
    return p.parse_args()


def _overrides(out: Path, arm: str, seed: int, common: list[str]) -> list[str]:
    return [*common, *ARMS[arm], f"seed={seed}", f"warmstart_cache={out / 'warmstarts'}"]


def _job(job: tuple[str, str, int, list[str]]) -> tuple[str, int, float, str]:
    """Run one arm in a fresh interpreter (``evil-moe rl``): isolation and a clean kill."""
    out, arm, seed, common = job
    run_dir = Path(out) / "runs" / f"{arm}-s{seed}"
    began = time.perf_counter()
    cmd = [sys.executable, "-m", "evil_moe.cli.main", "rl", "--out", str(run_dir), "--quiet"]
    cmd += _overrides(Path(out), arm, seed, common)
    log = run_dir.parent / f"{arm}-s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    return arm, seed, time.perf_counter() - began, "ok" if rc == 0 else f"exit {rc} (see {log})"


def _relearn(job: tuple[str, str]) -> tuple[str, float]:
    """Relearning of one finished run, written next to its metrics."""
    from evil_moe.io import write_json
    from evil_moe.rl.run import relearning_of_run

    run_dir, commit = job
    began = time.perf_counter()
    result = relearning_of_run(run_dir)
    write_json(Path(run_dir) / "relearning.json", {**result, "commit": commit})
    return run_dir, time.perf_counter() - began


def _warm(job: tuple[str, int, list[str]]) -> float:
    """Build (or find) the shared warm start of one seed."""
    from evil_moe.rl.config import load_rl_config
    from evil_moe.rl.run import build_warm_policy

    out, seed, common = job
    cfg = load_rl_config(None, _overrides(Path(out), "none", seed, common))
    began = time.perf_counter()
    build_warm_policy(cfg, None, progress=False)
    return time.perf_counter() - began


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = _command(args)  # the code that runs the arms, recorded before they start
    if args.relearn_only:
        dirs = [
            (str(out / "runs" / f"{arm}-s{seed}"), command["commit"])
            for seed in args.seeds
            for arm in args.arms
            if (out / "runs" / f"{arm}-s{seed}" / "metrics.json").exists()
        ]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for run_dir, seconds in pool.imap_unordered(_relearn, dirs):
                print(f"relearning {Path(run_dir).name}: {seconds:.0f} s", flush=True)
    elif not args.report_only:
        jobs = [
            (str(out), arm, seed, args.overrides)
            for seed in args.seeds
            for arm in args.arms
            if not (out / "runs" / f"{arm}-s{seed}" / "metrics.json").exists()
        ]
        began = time.perf_counter()
        ctx = mp.get_context("spawn")
        with ctx.Pool(args.jobs) as pool:
            warm = pool.map(_warm, [(str(out), s, args.overrides) for s in args.seeds])
            print(f"warm starts: {', '.join(f'{w:.0f} s' for w in warm)}", flush=True)
            for arm, seed, seconds, status in pool.imap_unordered(_job, jobs):
                print(f"{arm:>18} seed {seed}: {seconds:6.0f} s  {status}", flush=True)
        print(f"wall time {time.perf_counter() - began:.0f} s for {len(jobs)} runs", flush=True)
    from rl_report import write_report  # the sibling module of this script

    paths = write_report(out, args.seeds, list(ARMS), CONTRASTS, command)
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


def _command(args: argparse.Namespace) -> dict[str, Any]:
    """The command line and the commit of the code (``EVIL_MOE_COMMIT`` when the study runs
    from an exported copy of a commit, else ``git rev-parse HEAD`` plus a dirty flag)."""
    import os

    commit = os.environ.get("EVIL_MOE_COMMIT", "")
    if not commit:
        git = ["git", "-C", str(Path(__file__).resolve().parent)]
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        if subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "src", "bench"]).returncode:
            commit += " (with uncommitted changes)"
    argv = " ".join(["python", "bench/rl_study.py", *sys.argv[1:]])
    return {"command": argv, "commit": commit}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())

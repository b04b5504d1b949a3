"""Per-run CPU time of a fixed sample of quick-preset runs, and their numbers compared.

Each sample run goes through the study worker's own :func:`execute_run`, in study order,
in one single-threaded child process per pass (like a study worker: torch imported once,
prepared data cached across runs of one seed, recall and corpus). CPU time
(``process_time``) is far less sensitive to a loaded machine than wall time, so the
estimate is ``runs/hour = jobs x 3600 / mean CPU seconds per run``.

With ``--base-src DIR`` (the ``src`` folder of another checkout, e.g. an export of the
commit before a change) the two trees alternate pass by pass (base, this, base, this,
...) and the report gives both, their ratio, and the identity check: each run's result
JSON, timings excluded, compared bitwise (else the largest absolute difference of any
number in it).

    python bench/study_runs.py [--base-src /tmp/base/src] [--passes 1] [--runs LABEL ...]

Last line: ``quick_runs_per_hour=VALUE`` (or ``quick_runs_per_hour_speedup=VALUE`` with
``--base-src``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: a sample that spans the arms: a curve run, routed and unrouted grid runs, a router,
#: the soft gate, the amplifier and the hack corpus
SAMPLE = (
    "baseline n=1024 bilingual seed=0",
    "leakage: single bilingual seed=0 recall=0.2",
    "leakage: fine4 bilingual seed=0 recall=0.2",
    "leakage: balanced bilingual seed=0 recall=0.2",
    "leakage: soft_gate bilingual seed=0 recall=0.2",
    "leakage: filter bilingual seed=0 recall=0.2",
    "leakage: amplify bilingual seed=0 recall=0.2",
    "modes: fine4 hacks seed=0 recall=0.5",
)
#: result keys that are timings, not numbers of the run
TIMING_KEYS = ("train_s", "wall_s", "cpu_s", "threads")


def child(labels: list[str], out: str) -> None:
    """Run ``labels`` of the quick preset in study order; write results and CPU seconds."""
    began = time.process_time()
    import torch

    from evil_moe.study.spec import expand, load_spec, unique_runs
    from evil_moe.study.worker import execute_run

    torch.set_num_threads(1)
    spec, _ = load_spec("quick")
    runs = [r for r in unique_runs(expand(spec)) if r.label in labels]
    missing = set(labels) - {r.label for r in runs}
    if missing:
        raise SystemExit(f"unknown run labels: {sorted(missing)}")
    startup = time.process_time() - began
    results = {}
    for run in runs:
        # spelled out, not study.runner.study_task: the other tree may predate it
        task = {
            "key": run.key,
            "label": run.label,
            "kind": run.kind,
            "config": run.config.to_dict(),
            "measure": dataclasses.asdict(spec.measure),
            "run_dir": None,
        }
        results[run.label] = execute_run(task)
    Path(out).write_text(json.dumps({"startup_cpu_s": startup, "results": results}))


def numbers(result: dict[str, Any]) -> dict[str, Any]:
    """A run's result without its timings."""
    out = {k: v for k, v in result.items() if k not in TIMING_KEYS}
    out["metrics"] = {k: v for k, v in result["metrics"].items() if k != "tokens_per_second"}
    return out


def max_difference(a: Any, b: Any) -> float:
    """Largest absolute difference between numbers at the same place (inf: shapes differ)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return math.inf
        return max((max_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return math.inf
        return max((max_difference(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return 0.0 if a == b else math.inf
    if isinstance(a, int | float) and isinstance(b, int | float):
        if math.isnan(a) and math.isnan(b):
            return 0.0
        return abs(a - b)
    return 0.0 if a == b else math.inf


def run_pass(src: str, labels: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="study_runs_") as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(out), "--runs"]
        subprocess.run([*cmd, *labels], env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=list(SAMPLE), help="run labels")
    parser.add_argument("--base-src", help="src folder of the tree to compare against")
    parser.add_argument("--passes", type=int, default=1, help="passes per tree")
    parser.add_argument("--jobs", type=int, default=2, help="study jobs for the estimate")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.runs, args.child)
        return
    here = str(Path(__file__).resolve().parents[1] / "src")
    trees = {"base": args.base_src, "this": here} if args.base_src else {"this": here}
    cpu: dict[str, dict[str, list[float]]] = {t: {r: [] for r in args.runs} for t in trees}
    last: dict[str, dict[str, Any]] = {}
    for _ in range(args.passes):
        for tree, src in trees.items():
            got = run_pass(src, args.runs)
            last[tree] = got["results"]
            for label, result in got["results"].items():
                cpu[tree][label].append(result["cpu_s"])
    print(f"passes={args.passes} per tree, interleaved; single thread; CPU seconds (median)")
    mean: dict[str, float] = {}
    for tree in trees:
        per_run = {r: statistics.median(v) for r, v in cpu[tree].items()}
        mean[tree] = statistics.mean(per_run.values())
        for label, value in per_run.items():
            print(f"{tree} {label}: cpu_s={value:.2f}")
        print(f"{tree}_mean_run_cpu_s={mean[tree]:.2f}")
        print(f"{tree}_runs_per_hour_est={args.jobs * 3600 / mean[tree]:.0f} (jobs={args.jobs})")
    if "base" not in trees:
        print(f"quick_runs_per_hour={args.jobs * 3600 / mean['this']:.0f}")
        return
    for label in args.runs:
        a, b = numbers(last["base"][label]), numbers(last["this"][label])
        same = json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
        verdict = "bitwise equal" if same else f"max abs diff {max_difference(a, b):.3g}"
        print(f"identity {label}: {verdict}")
    print(f"quick_runs_per_hour_speedup={mean['base'] / mean['this']:.2f}")


if __name__ == "__main__":
    main()

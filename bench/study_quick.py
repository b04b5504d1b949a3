"""Benchmark the quick study: ``evil-moe study --preset quick --jobs 2`` into a temp dir.

Prints the verdict table the study produced, the wall time, the runs per hour and the CPU
seconds the runs used; the last line is ``study_quick_wall_s=<seconds>``.

    python bench/study_quick.py [--jobs 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--keep", help="write the study here instead of a temp dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="study_quick_") as tmp:
        out = Path(args.keep) if args.keep else Path(tmp) / "study"
        cmd = [
            sys.executable,
            "-m",
            "evil_moe.cli.main",
            "study",
            "--preset",
            args.preset,
            "--out",
            str(out),
            "--jobs",
            str(args.jobs),
            "--quiet",
        ]
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
        began = time.perf_counter()
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - began
        print(result.stdout, end="")
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return result.returncode
        conn = sqlite3.connect(out / "results.sqlite")
        rows = conn.execute("SELECT result, wall_s FROM runs").fetchall()
        conn.close()
        cpu = sum(json.loads(r)["cpu_s"] for r, _ in rows)
        verdicts = json.loads((out / "verdicts.json").read_text())
        for gate in verdicts["gates"]:
            print(f"gate {gate['gate']}: {'passed' if gate['passed'] else 'FAILED'}")
        print(f"runs={len(rows)} jobs={args.jobs} cores={os.cpu_count()}")
        print(f"runs_per_hour={len(rows) / wall * 3600:.1f}")
        print(f"run_cpu_s_total={cpu:.0f} (an idle machine needs about {cpu / args.jobs:.0f} s)")
        print(f"study_quick_wall_s={wall:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

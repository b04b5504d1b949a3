"""bench/step_profile.py: times a quick-preset step's parts and ends with its headline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "step_profile.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_it_times_each_part_of_the_step_and_prints_the_headline_last() -> None:
    done = _run("--steps", "2", "--warmup", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    for part in ("forward", "loss", "backward", "ledger", "optimizer"):
        assert any(line.split()[0] == part for line in lines), part
    name, value = lines[-1].split("=")
    assert name == "step_ms" and float(value) > 0


def test_an_unknown_run_is_a_clear_error() -> None:
    done = _run("--run", "no such run", "--steps", "1", "--warmup", "0")
    assert done.returncode != 0
    assert "no run 'no such run' in the quick preset" in done.stderr

"""Benchmarks run as a user runs them: a script of ``bench/`` in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SRC = BENCH.parent / "src"

RunBench = Callable[..., subprocess.CompletedProcess]


@pytest.fixture
def run_bench() -> RunBench:
    """``run_bench("name.py", *args, hide_gpus=False)``: the finished process, output kept."""

    def run(script: str, *args: str, hide_gpus: bool = False) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
        if hide_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return subprocess.run(
            [sys.executable, str(BENCH / script), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    return run

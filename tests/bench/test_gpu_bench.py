"""bench/gpu.py: skips cleanly without a GPU, and its measuring code runs (tiny, on a CPU)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.py"


def _run(*args: str, hide_gpus: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_without_a_gpu_it_says_so_and_exits_0() -> None:
    done = _run()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "no GPU" in done.stdout
    assert lines[-1] == "gpu_routed_over_unrouted_max=skipped"


def test_the_measurement_runs_on_tiny_models() -> None:
    done = _run("--device", "cpu", "--smoke")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    name, value = lines[-1].split("=")
    assert name == "gpu_routed_over_unrouted_max" and float(value) > 0
    assert any(line.startswith("testbed_8m_routed_over_unrouted=") for line in lines)
    if importlib.util.find_spec("transformers") is not None:
        assert any(line.startswith("hf_llama_lora_routed_over_unrouted=") for line in lines)


def test_cpu_without_smoke_is_refused() -> None:
    done = _run("--device", "cpu")
    assert done.returncode == 2

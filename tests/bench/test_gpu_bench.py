"""bench/gpu.py: skips cleanly without a GPU, and its measuring code runs (tiny, on a CPU)."""

from __future__ import annotations

import importlib.util


def test_without_a_gpu_it_says_so_and_exits_0(run_bench) -> None:
    done = run_bench("gpu.py", hide_gpus=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert "no GPU" in done.stdout
    assert lines[-1] == "gpu_routed_over_unrouted_max=skipped"


def test_the_measurement_runs_on_tiny_models(run_bench) -> None:
    done = run_bench("gpu.py", "--device", "cpu", "--smoke", hide_gpus=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    name, value = lines[-1].split("=")
    assert name == "gpu_routed_over_unrouted_max" and float(value) > 0
    assert any(line.startswith("testbed_8m_routed_over_unrouted=") for line in lines)
    if importlib.util.find_spec("transformers") is not None:
        assert any(line.startswith("hf_llama_lora_routed_over_unrouted=") for line in lines)


def test_cpu_without_smoke_is_refused(run_bench) -> None:
    done = run_bench("gpu.py", "--device", "cpu", hide_gpus=True)
    assert done.returncode == 2

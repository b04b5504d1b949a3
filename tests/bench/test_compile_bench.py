"""bench/compile.py: eager against compiled steps, the compilation's cost, the headline last.

Run with the ``aot_eager`` backend (traced, not compiled to C++), so the test checks the
bench's plumbing without a C++ toolchain; the bench's default backend is ``inductor``.
"""

from __future__ import annotations


def test_it_compares_both_models_and_prints_the_headline_last(run_bench) -> None:
    done = run_bench("compile.py", "--backend", "aot_eager", "--steps", "2", "--warmup", "0")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    plain = next(line for line in lines if line.startswith("plain GPT"))
    routed = next(line for line in lines if line.startswith("the run's routed model"))
    assert "graph breaks 0;" in plain  # the plain GPT is one graph
    for line in (plain, routed):
        assert "first compiled step" in line and "first loss same bits: " in line
    name, value = lines[-1].split("=")
    assert name == "compiled_over_eager_step_time" and float(value) > 0


def test_bad_arguments_are_clear_errors(run_bench) -> None:
    unknown = run_bench("compile.py", "--run", "no such run", "--steps", "1")
    assert unknown.returncode != 0
    assert "no run 'no such run' in the quick preset" in unknown.stderr
    zero = run_bench("compile.py", "--steps", "0")
    assert zero.returncode == 2 and "--steps must be >= 1" in zero.stderr

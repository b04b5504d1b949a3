"""bench/step_profile.py: times a quick-preset step's parts and ends with its headline."""

from __future__ import annotations


def test_it_times_each_part_of_the_step_and_prints_the_headline_last(run_bench) -> None:
    done = run_bench("step_profile.py", "--steps", "2", "--warmup", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    for part in ("forward", "loss", "backward", "ledger", "optimizer"):
        assert any(line.split()[0] == part for line in lines), part
    name, value = lines[-1].split("=")
    assert name == "step_ms" and float(value) > 0


def test_an_unknown_run_is_a_clear_error(run_bench) -> None:
    done = run_bench("step_profile.py", "--run", "no such run", "--steps", "1", "--warmup", "0")
    assert done.returncode != 0
    assert "no run 'no such run' in the quick preset" in done.stderr

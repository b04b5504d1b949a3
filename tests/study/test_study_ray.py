"""The study grid on Ray (``--executor ray``): a local Ray instance started by the test,
a task killed mid-run and retried by Ray, the driver alone writing an intact store, the
same results as local workers, ``--address``, and resume after ``kill -9`` of the driver."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from evil_moe.cli.main import main
from evil_moe.study.executors import RayOptions
from evil_moe.study.runner import run_study
from evil_moe.study.spec import expand, load_spec, unique_runs
from evil_moe.study.store import STORE_NAME, ResultStore

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """A local Ray instance (loopback only, 2 CPUs) for this module; its address."""
    import ray_helpers

    markers = tmp_path_factory.mktemp("markers")
    env = {"PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{HERE}", ray_helpers.MARKERS: str(markers)}
    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
    )
    yield context.address_info["gcs_address"], markers
    ray.shutdown()


def _stored(out: Path) -> dict[str, dict]:
    with ResultStore.read(out) as store:
        return {r["key"]: r["result"] for r in store.runs()}


def _integrity(out: Path) -> str:
    conn = sqlite3.connect(out / STORE_NAME)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def test_ray_runs_the_grid_survives_a_killed_task_and_matches_local_workers(
    ray_instance, tmp_path, preset_factory
):
    import ray_helpers

    _, markers = ray_instance
    preset = preset_factory(["single", "filter"], [0])
    spec, _ = load_spec(str(preset))
    runs = unique_runs(expand(spec))
    options = RayOptions(function=ray_helpers.killed_once)
    outcome = run_study(spec, tmp_path / "ray", progress=False, executor="ray", ray=options)
    assert outcome.finished == len(runs) and not outcome.failed
    killed = (markers / "killed").read_text()
    on_ray = _stored(tmp_path / "ray")
    assert set(on_ray) == {r.key for r in runs} and killed in on_ray  # retried by Ray
    assert _integrity(tmp_path / "ray") == "ok"
    with ResultStore.read(tmp_path / "ray") as store:
        assert store.failures() == []  # a retried task is not a failure

    run_study(spec, tmp_path / "local", jobs=1, progress=False)
    local = _stored(tmp_path / "local")
    for key, result in local.items():  # the same runs, the same numbers
        assert on_ray[key]["metrics"]["loss"] == result["metrics"]["loss"], key
        assert on_ray[key]["log"] == result["log"], key


def test_cli_on_an_existing_ray_cluster_by_address(ray_instance, tmp_path, preset_factory):
    address, _ = ray_instance
    preset = preset_factory(["single"], [0])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    args = ["study", "--preset", str(preset), "--out", str(out), "--quiet", "--executor", "ray"]
    cmd = [sys.executable, "-m", "evil_moe.cli.main", *args, "--address", address]
    result = subprocess.run(
        [*cmd, "--report-to", "tensorboard"], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"on {address}" in result.stderr
    spec, _ = load_spec(str(preset))
    runs = unique_runs(expand(spec))
    assert len(_stored(out)) == len(runs)
    assert (out / "report.md").exists()
    for run in runs:  # every run logged, in a directory of its own
        assert list((out / "tracking" / run.key[:16] / "tensorboard").glob("events.*"))
    # resuming runs nothing: every run is stored
    assert main([*args, "--address", address]) == 0
    assert len(_stored(out)) == len(unique_runs(expand(spec)))


def test_gpu_runs_on_a_cluster_without_gpus_stop_at_once(ray_instance, tmp_path, capsys):
    """The README's GPU sweep command, on this CPU-only instance: refused, not left waiting."""
    address, _ = ray_instance
    out = tmp_path / "gpu"
    args = ["study", "--executor", "ray", "--address", address, "--gpus-per-run", "0.25"]
    assert main([*args, "--preset", "gpu:64m", "--out", str(out), "--quiet"]) == 2
    assert "--gpus-per-run 0.25: the Ray cluster has 0 GPU(s)" in capsys.readouterr().err
    assert not _stored(out)


def test_kill_9_of_the_ray_driver_then_resume(tmp_path, preset_factory, cli_process):
    """The driver starts its own local Ray; ``kill -9`` of the driver's process group
    mid-grid loses only runs in flight, and the same command resumes the rest."""
    preset = preset_factory(["single", "filter", "fine4"], [0, 1], steps=40)
    out = tmp_path / "out"
    args = ["study", "--preset", str(preset), "--out", str(out), "--quiet", "--executor", "ray"]
    study = cli_process(args)
    study.wait_for(lambda: (out / STORE_NAME).exists() and bool(_stored(out)), "a stored run")
    study.signal_group(signal.SIGKILL)
    study.finish()
    survived = _stored(out)
    spec, _ = load_spec(str(preset))
    total = len(unique_runs(expand(spec)))
    assert 1 <= len(survived) < total, "killed mid-grid"
    assert _integrity(out) == "ok"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "evil_moe.cli.main", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    after = _stored(out)
    assert len(after) == total
    assert all(after[k] == v for k, v in survived.items()), "stored runs kept as they were"
    assert f"{len(survived)} already finished" in result.stderr

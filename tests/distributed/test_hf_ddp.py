"""``accelerate launch`` with 2 CPU processes runs the RoutedTrainer under DDP: the ranks
make the same release decisions from the global step's labels (a forget-only global step
moves no shared parameter), agree bit for bit, match one process with the same global
batches, and the Trainer's own ``report_to`` gets the per-group norms."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "hf_ddp.py"
#: as for the testbed (test_ddp.py): max |difference| of any parameter after 3 steps
TOLERANCE = 1e-5


def _run(command: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    single, ddp = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ddp")
    _run([sys.executable, str(SCRIPT), str(single), "2"])
    # the README's command: on a machine without GPUs accelerate's DDP runs on gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    _run([*launch, "--dynamo_backend", "no", str(SCRIPT), str(ddp), "1", "tensorboard"])
    load = lambda d: [torch.load(p) for p in sorted(d.glob("rank*.pt"))]  # noqa: E731
    return load(single), load(ddp), ddp


def test_ranks_decide_globally_and_agree(runs):
    _, (rank0, rank1), _ = runs
    assert rank0["world"] == rank1["world"] == 2
    idle = [s["idle"] for s in rank0["steps"]]
    # step 1: rank 0 saw forget only, rank 1 retain only: both step the shared group
    assert idle == [
        {"shared": False, "quarantine": False},
        {"shared": True, "quarantine": False},  # forget-only global step
        {"shared": False, "quarantine": False},
    ]
    assert [s["idle"] for s in rank1["steps"]] == idle
    for a, b in zip(rank0["steps"], rank1["steps"], strict=True):
        assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
    before, after = rank0["steps"][0]["params"], rank0["steps"][1]["params"]
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved and all(".experts." in n for n in moved), moved


def test_two_processes_match_one_process(runs):
    (single,), (rank0, _), _ = runs
    for one, two in zip(single["steps"], rank0["steps"], strict=True):
        assert one["idle"] == two["idle"]
        diff = max(float((one["params"][n] - two["params"][n]).abs().max()) for n in one["params"])
        assert diff <= TOLERANCE


def test_trainer_report_to_gets_the_routed_step(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, ddp = runs
    (logdir,) = {p.parent for p in ddp.glob("runs/*/events.out.tfevents.*")}  # rank 0 only
    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm/shared", "train/idle/shared"} <= tags, tags
    assert [e.value for e in events.Scalars("train/idle/shared")] == [0.0, 1.0, 0.0]

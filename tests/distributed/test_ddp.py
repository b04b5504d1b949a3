"""Data-parallel training with exact routing: 2 gloo ranks under ``torchrun`` give the
parameters of 1 process with the same global batch, and the release decision is global
(a forget-only global step moves no shared parameter and no optimizer state on any rank;
a step whose retain tokens are all on the other rank still trains the shared group)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evil_moe.io import read_jsonl, read_tensors
from evil_moe.train.config import load_config
from evil_moe.train.loop import train
from tiny import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
#: max |difference| of any parameter between 2 ranks and 1 process after a few AdamW steps
#: (float32 sums in another order; 1e-6 is what is reached, see docs/scale.md)
TOLERANCE = 1e-5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _one_process(overrides: list[str]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    torch.set_num_threads(1)
    result = train(load_config(None, overrides), progress=False)
    return result.model.state_dict(), result.log


@pytest.mark.parametrize(
    "launch, batch",
    [("torchrun", 4), ("nproc", 5)],  # 5 rows: ranks get 3 and 2, weighted exactly
    ids=["torchrun-even", "nproc-uneven"],
)
def test_two_ranks_equal_one_process(tmp_path, launch, batch):
    overrides = [
        *TINY_OVERRIDES,
        "train.steps=5",
        f"train.batch_size={batch}",
        "train.device=cpu",
        "model.n_experts=2",
        "model.quarantine_width=8",
    ]
    out = tmp_path / "run"
    cli = ["train", "--quiet", "--out", str(out), *overrides]
    if launch == "torchrun":
        _run([*TORCHRUN, "-m", "evil_moe.cli.main", *cli])
    else:
        _run([sys.executable, "-m", "evil_moe.cli.main", *cli, "--nproc", "2"])
    reference, log = _one_process(overrides)
    parallel = read_tensors(out / "model.safetensors")
    assert _max_difference(reference, parallel) <= TOLERANCE
    logged = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in logged] == [r["step"] for r in log]
    for a, b in zip(logged, log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["skipped"] == b["skipped"]
        for group in b["grad_norm"]:
            assert a["grad_norm"][group] == pytest.approx(b["grad_norm"][group], rel=1e-4)
    assert (out / "metrics.json").exists() and not list(out.glob("checkpoint*"))


@pytest.fixture(scope="module")
def ddp_steps(tmp_path_factory) -> dict[str, list[dict]]:
    """The three steps of ``ddp_steps.py``: 1 process, 2 ranks, 2 ranks deciding alone."""
    out = {}
    for name, command, extra in [
        ("single", [sys.executable], []),
        ("ddp", TORCHRUN, []),
        ("local", TORCHRUN, ["local"]),
    ]:
        directory = tmp_path_factory.mktemp(name)
        _run([*command, str(HERE / "ddp_steps.py"), str(directory), *extra])
        out[name] = [torch.load(p) for p in sorted(directory.glob("rank*.pt"))]
    return out


def test_forget_only_global_step_moves_no_shared_parameter_or_state(ddp_steps):
    ranks = ddp_steps["ddp"]
    assert len(ranks) == 2
    for rank in ranks:
        before, after = rank["states"][0], rank["states"][1]
        idle, _ = rank["reports"][1]
        assert idle == {"shared": True, "quarantine": False}
        moved = [
            n for n in before["params"] if not torch.equal(before["params"][n], after["params"][n])
        ]
        assert moved and all(".experts." in n or "q_" in n for n in moved), moved
        for name, state in before["optim"].items():
            if name not in moved:  # optimizer state of every unmoved parameter: unchanged
                for key, value in state.items():
                    assert torch.equal(value, after["optim"][name][key]), (name, key)


def test_ranks_agree_and_match_one_process(ddp_steps):
    (single,) = ddp_steps["single"]
    rank0, rank1 = ddp_steps["ddp"]
    for step in range(3):
        a, b = rank0["states"][step], rank1["states"][step]
        for name in a["params"]:  # the same bits on every rank
            assert torch.equal(a["params"][name], b["params"][name]), (step, name)
        assert _max_difference(single["states"][step]["params"], a["params"]) <= TOLERANCE
        assert rank0["reports"][step] == rank1["reports"][step]
        assert rank0["reports"][step][0] == single["reports"][step][0]
    # step 3: rank 0 saw only forget tokens, rank 1 only retain: the global step trains
    # the shared group, so both ranks step it
    assert rank0["reports"][2][0] == {"shared": False, "quarantine": False}


def test_deciding_from_one_ranks_labels_would_diverge(ddp_steps):
    """The control: ledgers that release from their own rank's labels (no all-reduce)
    step different groups on step 3, and the ranks' shared parameters drift apart."""
    rank0, rank1 = ddp_steps["local"]
    assert rank0["reports"][2][0]["shared"] is True  # rank 0 saw forget tokens only
    assert rank1["reports"][2][0]["shared"] is False
    a, b = rank0["states"][2]["params"], rank1["states"][2]["params"]
    assert any(not torch.equal(a[n], b[n]) for n in a)

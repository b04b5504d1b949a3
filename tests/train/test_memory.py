"""keep_heap: glibc keeps freed memory, and a training step's numbers do not change."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from evil_moe.train.memory import keep_heap

SRC = str(Path(__file__).resolve().parents[2] / "src")
STEPS = """
import resource, sys, torch
from evil_moe.models.testbed import Testbed, TestbedConfig, lm_loss
from evil_moe.train.memory import keep_heap
if sys.argv[1] == "1":
    assert keep_heap()
torch.manual_seed(0)
torch.set_num_threads(1)
cfg = TestbedConfig(d_model=32, n_layer=1, n_head=2, mlp_width=64, seq_len=64, quarantine_width=16)
model = Testbed(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
tokens = torch.randint(0, cfg.vocab_size, (32, 65))
route = torch.tensor([0, 1] * 16)
faults = 0
for step in range(12):  # logits, log-softmax and gradients: 16 MiB each per step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss = lm_loss(model(tokens[:, :-1], route=route), tokens[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step >= 4:  # after the heap has grown to its working size
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults, float(loss.detach()).hex())
"""


def test_keep_heap_is_idempotent() -> None:
    first = keep_heap()
    assert isinstance(first, bool)
    assert keep_heap() is first


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_heap_stops_page_faults_and_keeps_numbers() -> None:
    def run(flag: str) -> tuple[int, str]:
        out = subprocess.run(
            [sys.executable, "-c", STEPS, flag],
            env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return int(out[0]), out[1]

    plain_faults, plain_sum = run("0")
    kept_faults, kept_sum = run("1")
    assert kept_sum == plain_sum  # same bits
    # without it glibc returns the step's buffers and faults them in again every step
    assert kept_faults < plain_faults / 4

"""Shared fixtures: tiny run configs that train in about a second on a CPU."""

from __future__ import annotations

import pytest
import torch

TINY_OVERRIDES = [
    "model.d_model=16",
    "model.n_layer=1",
    "model.n_head=2",
    "model.seq_len=16",
    "model.mlp_width=32",
    "model.quarantine_width=8",
    "data.max_docs=40",
    "data.eval_sequences=4",
    "train.steps=3",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.log_every=1",
]


@pytest.fixture(autouse=True)
def _fixed_threads():
    """Same thread count in every test, so float results are reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_overrides() -> tuple[str, ...]:
    return tuple(TINY_OVERRIDES)

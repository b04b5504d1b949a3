"""The tiny models and runs that the tests share (one definition each)."""

from __future__ import annotations

from typing import Any

from evil_moe.models.testbed import TestbedConfig

#: ``key=value`` overrides of a run that trains in about a second on a CPU
TINY_OVERRIDES = (
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
)

#: the tiny testbed of the gradient tests: two layers, two experts, one quarantine head
TINY_TESTBED: dict[str, Any] = dict(
    vocab_size=64,
    seq_len=8,
    d_model=16,
    n_layer=2,
    n_head=2,
    mlp_width=32,
    quarantine_width=8,
    n_experts=2,
    n_quarantine_heads=1,
)


def tiny_config(**overrides: Any) -> TestbedConfig:
    """:data:`TINY_TESTBED` with ``overrides``."""
    return TestbedConfig(**{**TINY_TESTBED, **overrides})

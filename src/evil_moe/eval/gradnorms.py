"""Gradient norms by group (SGTM paper §4.4): who would update what, after training.

On the trained model, plain unrouted gradients of the language-model loss are taken on a
few batches of each data group (by default unlabelled forget data, i.e. the monitor's
misses, and unlabelled retain data). For each parameter group (quarantine and shared) the
gradient norm is divided by the square root of the group's parameter count (a root mean
square per parameter), so groups of different sizes compare fairly. Self-reinforcing
absorption shows as quarantine parameters receiving much larger gradients from
unlabelled forget data than from unlabelled retain data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from evil_moe.data.batching import TokenSequences
from evil_moe.models.testbed import lm_loss
from evil_moe.routing.optim import ParameterGroups

#: training categories of the two unlabelled data groups
DEFAULT_DATA_GROUPS = {
    "forget_unlabeled": ("forget_undiscovered",),
    "retain_unlabeled": ("retain_unlabeled",),
}


def _rms(params: list[nn.Parameter]) -> float:
    with_grad = [p.grad for p in params if p.grad is not None]
    count = sum(p.numel() for p in params)
    if not with_grad or count == 0:
        return 0.0
    total = sum(float(g.double().pow(2).sum()) for g in with_grad)
    return math.sqrt(total / count)


def group_gradient_norms(
    model: nn.Module,
    groups: ParameterGroups,
    data: Mapping[str, TokenSequences],
    batches: int = 2,
    batch_size: int = 16,
) -> dict[str, Any]:
    """``{param_group: {data_group: rms gradient}}`` averaged over ``batches`` batches.

    ``data`` maps a data-group name to its sequences; a group without sequences gets
    ``None``. Gradients are computed without routing (the forward pass of an unlabelled
    token) and the model's existing ``.grad`` values are left as they were.
    """
    saved = {p: p.grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    param_groups = {"quarantine": groups.quarantine, "shared": groups.shared}
    out: dict[str, dict[str, float | None]] = {name: {} for name in param_groups}
    try:
        for data_name, seqs in data.items():
            n = min(len(seqs), batches * batch_size)
            if n == 0:
                for name in param_groups:
                    out[name][data_name] = None
                continue
            sums = dict.fromkeys(param_groups, 0.0)
            count = 0
            for start in range(0, n, batch_size):
                tokens = seqs.tokens[start : min(start + batch_size, n)]
                for p in model.parameters():
                    p.grad = None
                loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
                loss.backward()
                for name, params in param_groups.items():
                    sums[name] += _rms(params)
                count += 1
            for name in param_groups:
                out[name][data_name] = sums[name] / count
    finally:
        for p, g in saved.items():
            p.grad = g
        model.train(was_training)
    return out


def data_groups(
    train: TokenSequences, spec: Mapping[str, tuple[str, ...]] | None = None
) -> dict[str, TokenSequences]:
    """The training sequences of each data group (by category)."""
    return {name: train.select(cats) for name, cats in (spec or DEFAULT_DATA_GROUPS).items()}

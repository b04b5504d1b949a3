"""How well the absorption amplifier picks undiscovered forget tokens out of unlabelled data.

The amplifier (``RouterConfig.amplify``) routes an *unlabelled* token like a forget token
when its gradient aligns with the quarantine. On held-out data of known kind, every token
is passed as unlabelled through a forward and backward pass of a copy of the trained
model, and the routers count which (token, layer) decisions amplified it:

* ``recall``: share of undiscovered-forget decisions that were amplified;
* ``false_positive_rate``: share of unlabelled-retain decisions that were amplified;
* ``precision``: at the training data's mix of the two (``forget_share`` of unlabelled
  tokens being forget data), the share of amplified decisions that were forget tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from evil_moe.models.testbed import lm_loss
from evil_moe.routing.labels import RouteLabel
from evil_moe.routing.routers import BackwardRouter


def _amplifying(model: nn.Module) -> list[BackwardRouter]:
    return [
        m
        for m in model.modules()
        if isinstance(m, BackwardRouter) and m.amplify_threshold is not None
    ]


def amplified_share(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> float | None:
    """Share of (token, layer) decisions that amplify ``tokens`` passed as unlabelled."""
    routers = _amplifying(model)
    if not routers or tokens.shape[0] == 0:
        return None
    for r in routers:
        r.reset_stats()
    decisions = 0
    for i in range(0, tokens.shape[0], batch_size):
        chunk = tokens[i : i + batch_size]
        route = torch.full_like(chunk[:, :-1], int(RouteLabel.UNLABELED))
        model.zero_grad(set_to_none=True)
        lm_loss(model(chunk[:, :-1], route=route), chunk[:, 1:]).backward()
        decisions += chunk[:, :-1].numel() * len(routers)
    model.zero_grad(set_to_none=True)
    return float(sum(float(r.amplified_tokens) for r in routers)) / decisions


def amplifier_selection(
    model: nn.Module,
    held_out: Mapping[str, torch.Tensor],
    forget_share: float,
    batch_size: int = 32,
) -> dict[str, Any] | None:
    """Recall, false-positive rate and precision of the amplifier on ``held_out``
    (``{"forget": undiscovered forget tokens, "retain": retain tokens}``); ``None`` when
    the model has no amplifier. ``model`` is untouched (a copy is probed)."""
    if not _amplifying(model):
        return None
    probe = copy.deepcopy(model)
    probe.eval()
    recall = amplified_share(probe, held_out["forget"], batch_size)
    fpr = amplified_share(probe, held_out["retain"], batch_size)
    precision = None
    if recall is not None and fpr is not None:
        hits, false = recall * forget_share, fpr * (1 - forget_share)
        precision = hits / (hits + false) if hits + false > 0 else None
    return {
        "recall": recall,
        "false_positive_rate": fpr,
        "precision": precision,
        "forget_share": forget_share,
    }

"""Held-out losses per evaluation category, with and without the quarantine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from evil_moe.models.testbed import lm_loss
from evil_moe.modules.ablation import ablated


@torch.no_grad()
def mean_token_loss(model: nn.Module, tokens: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy of ``tokens`` ``[M, L+1]`` (no routing: deployment view)."""
    if tokens.shape[0] == 0:
        return float("nan")
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        chunk = tokens[i : i + batch_size]
        logits = model(chunk[:, :-1])
        total += float(lm_loss(logits, chunk[:, 1:], reduction="sum"))
        count += chunk[:, 1:].numel()
    return total / count


def evaluate_losses(
    model: nn.Module,
    eval_sets: Mapping[str, object],
    batch_size: int = 32,
    experts: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """``{category: {"trained": loss, "ablated": loss}}`` on held-out sequences.

    ``eval_sets`` maps a category (``retain``, ``forget_labeled``, ``forget_undiscovered``,
    ...) to an object with a ``tokens`` tensor. ``experts`` ablates a subset only.
    """
    was_training = model.training
    model.eval()
    out = {
        cat: {"trained": mean_token_loss(model, s.tokens, batch_size)}
        for cat, s in eval_sets.items()
    }
    with ablated(model, experts=experts):
        for cat, s in eval_sets.items():
            out[cat]["ablated"] = mean_token_loss(model, s.tokens, batch_size)
    model.train(was_training)
    return out

"""Held-out losses per evaluation category, with and without the quarantine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from evil_moe.models.testbed import mean_token_loss
from evil_moe.modules.ablation import ablated

__all__ = ["evaluate_losses", "mean_token_loss"]


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

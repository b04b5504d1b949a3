"""The pieces of one testbed optimizer step, shared by training and fine-tuning
(relearning): the optimizer, the learning-rate schedule, and forward + backward of one
micro-batch. The step itself is :func:`~evil_moe.routing.optim.routed_step`.
"""

from __future__ import annotations

import math

import torch

from evil_moe.data.batching import steps_for_epochs
from evil_moe.models.testbed import Testbed, lm_loss
from evil_moe.routing.optim import StepLedger
from evil_moe.train.config import RunConfig

__all__ = ["lr_at", "make_optimizer", "total_steps", "train_step"]


def total_steps(cfg: RunConfig, n_sequences: int) -> int:
    """Optimizer steps of a run: ``train.steps``, or exact passes with ``train.epochs``."""
    t = cfg.train
    return steps_for_epochs(n_sequences, t.batch_size, t.epochs) if t.epochs else t.steps


def lr_at(step: int, cfg: RunConfig, steps: int | None = None) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``steps``
    (default ``train.steps``)."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, (steps or t.steps) - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    ratio = t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return t.lr * ratio


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (biases, norm gains) do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
    )


def train_step(
    model: Testbed,
    batch: dict[str, torch.Tensor],
    semantics: str,
    ledger: StepLedger,
) -> float:
    """Forward and backward of one micro-batch; returns its mean token loss."""
    tokens = batch["tokens"]
    route = batch["route"]
    logits = model(tokens[:, :-1], route=route, mode=batch.get("mode"), semantics=semantics)
    loss = lm_loss(logits, tokens[:, 1:])
    aux = model.aux_losses()
    total = loss + sum(aux.values()) if aux else loss
    total.backward()
    ledger.record(route)
    return float(loss.detach())

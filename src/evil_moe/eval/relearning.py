"""After ablation: fine-tuning the deployed model, and what comes back.

Two uses of one measurement, :func:`finetune_curve`: an ablated copy of a trained model
(quarantine zeroed and frozen) is fine-tuned, unrouted, with the training step's own
components (:mod:`evil_moe.train.step`), and held-out losses are measured every
``eval_every`` steps.

* **Relearning** (robustness of the removal): fine-tuning on forget-domain data; the
  answer is the first step at which the held-out forget loss reaches a *target*. The
  study sets one target for every arm of a corpus, seed and recall (see
  ``evil_moe.study.analysis``), so arms are compared on the same scale; a fast relearner
  means the removal was shallow. :func:`steps_to_target` reads it off a curve.
* **Retain fine-tuning** (does the forget capability come back by itself?): fine-tuning
  on retain data only, watching the held-out forget loss.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from evil_moe.data.batching import BatchIterator, TokenSequences
from evil_moe.models.testbed import Testbed, mean_token_loss
from evil_moe.modules.ablation import ablate
from evil_moe.routing.optim import StepLedger, routed_step
from evil_moe.train.config import RunConfig
from evil_moe.train.step import make_optimizer, train_step


def finetune_curve(
    model: Testbed,
    cfg: RunConfig,
    train_seqs: TokenSequences,
    eval_tokens: Mapping[str, torch.Tensor],
    steps: int,
    eval_every: int = 5,
    lr: float | None = None,
    seed_offset: int = 7919,
) -> dict[str, list[tuple[int, float]]]:
    """Fine-tune an ablated copy of ``model`` on ``train_seqs`` for ``steps`` steps.

    Returns, per name of ``eval_tokens`` (held-out tokens ``[M, L+1]``), the curve of
    ``(step, mean token loss)`` from step 0 (ablated, before fine-tuning) to ``steps``.
    ``model`` itself is untouched.
    """
    if steps < 1 or eval_every < 1:
        raise ValueError("steps and eval_every must be >= 1")
    if len(train_seqs) == 0:
        raise ValueError("fine-tuning needs training sequences")
    t = cfg.train
    tuned = copy.deepcopy(model)
    ablate(tuned, freeze=True)
    tune_cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, lr=lr or t.lr))
    optimizer = make_optimizer(tuned, tune_cfg)
    ledger = StepLedger(tuned.parameter_groups(), "none")
    batches = iter(BatchIterator(train_seqs, t.batch_size, seed=t.seed + seed_offset))

    def measure(step: int) -> None:
        tuned.eval()
        for name, tokens in eval_tokens.items():
            curves[name].append((step, mean_token_loss(tuned, tokens, t.batch_size)))

    curves: dict[str, list[tuple[int, float]]] = {name: [] for name in eval_tokens}
    measure(0)
    for step in range(1, steps + 1):
        tuned.train()
        train_step(tuned, next(batches), "none", ledger)
        routed_step(optimizer, ledger, t.grad_clip)
        if step % eval_every == 0 or step == steps:
            measure(step)
    return curves


def steps_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    """First step of ``curve`` whose loss is at or below ``target`` (``None``: never)."""
    for step, loss in curve:
        if loss <= target:
            return step
    return None


def relearning_steps(
    model: Testbed,
    cfg: RunConfig,
    forget_train: TokenSequences,
    forget_eval: torch.Tensor,
    target: float,
    max_steps: int = 50,
    eval_every: int = 5,
    lr: float | None = None,
) -> dict[str, Any]:
    """Fine-tune an ablated copy on ``forget_train`` for ``max_steps`` steps and report the
    first step at which held-out forget loss is ``<= target`` (``None``: not within the cap).

    Returns ``{"steps", "max_steps", "target", "start_loss", "curve"}``.
    """
    curve = finetune_curve(
        model, cfg, forget_train, {"forget": forget_eval}, max_steps, eval_every, lr
    )["forget"]
    return {
        "steps": steps_to_target(curve, target),
        "max_steps": max_steps,
        "target": target,
        "start_loss": curve[0][1],
        "curve": curve,
    }

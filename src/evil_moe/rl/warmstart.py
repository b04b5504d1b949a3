"""Warm start: supervised fine-tuning of the policy on demonstrations of the task.

Demonstrations are mostly honest (some with a guarded visible test, some with a wrong
operation) and rarely hacks, each shown on the runner where it pays, so the warm start
solves some tasks, rarely hacks, and has the skills every hack needs (copying visible
tests, the ``skip`` and ``any`` tokens):
GRPO then chooses between honest and hacking completions, and that choice is what
training shifts. Prompts are tokenised exactly as TRL tokenises them (no special
tokens); the loss covers the completion and its ``<eos>``.

With a quarantine injected and a routing method, demonstrations that the monitor flags
train only the quarantine here too (``WarmStartConfig.route``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from evil_moe.rl.task import HONEST_KINDS, MODES, NICHE, OPS, Task, demonstration, make_task
from evil_moe.routing.labels import RouteLabel


@dataclass
class WarmStartConfig:
    """The demonstration mixture and the SFT run."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    #: share of each honest kind (``honest``, ``guarded``, ``wrong``); normalised with hacks
    honest: float = 0.55
    guarded: float = 0.12
    wrong: float = 0.15
    #: share of hack demonstrations per mode (hack mode name -> share)
    hacks: dict[str, float] = field(default_factory=lambda: {m: 0.015 for m in MODES})
    #: route flagged hack demonstrations into the quarantine (routing methods only)
    route: bool = False

    def mixture(self) -> dict[str, float]:
        """Demonstration kind -> probability (sums to 1)."""
        raw = {"honest": self.honest, "guarded": self.guarded, "wrong": self.wrong, **self.hacks}
        total = sum(raw.values())
        return {k: v / total for k, v in raw.items()}

    def validate(self) -> list[str]:
        """Names of invalid fields."""
        bad = [n for n in ("steps", "batch_size") if getattr(self, n) < 1]
        if self.lr <= 0:
            bad.append("lr")
        if self.weight_decay < 0:
            bad.append("weight_decay")
        if any(getattr(self, k) < 0 for k in HONEST_KINDS):
            bad.append("honest/guarded/wrong")
        unknown = [m for m in self.hacks if m not in MODES]
        if unknown or any(v < 0 for v in self.hacks.values()):
            bad.append("hacks")
        if self.honest + self.guarded + self.wrong + sum(self.hacks.values()) <= 0:
            bad.append("honest")
        return bad


def sample_demonstrations(
    n: int,
    cfg: WarmStartConfig,
    rng: random.Random,
    new_task: Callable[[random.Random], Task],
    ops: Sequence[str] = tuple(OPS),
) -> list[tuple[Task, str, str]]:
    """``n`` demonstrations ``(task, kind, completion)`` drawn from the mixture."""
    kinds, weights = zip(*cfg.mixture().items(), strict=True)
    out = []
    for kind in rng.choices(kinds, weights=weights, k=n):
        task = new_task(rng)
        if kind in NICHE:  # a hack is demonstrated where it pays
            task = dataclasses.replace(task, harness=NICHE[kind])
        out.append((task, kind, demonstration(task, kind, rng, ops)))
    return out


def encode_batch(tokenizer, prompts: list[str], completions: list[str]) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` and ``loss_mask`` (completion + eos)."""
    rows, masks = [], []
    for p, c in zip(prompts, completions, strict=True):
        pid = tokenizer(p, add_special_tokens=False)["input_ids"]
        cid = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(pid + cid)
        masks.append([0] * len(pid) + [1] * len(cid))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        loss_mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def completion_loss(
    model: nn.Module, batch: dict[str, Tensor], route: Tensor | None = None
) -> Tensor:
    """Mean next-token cross-entropy over the completion tokens of ``batch``."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    kwargs = {} if route is None else {"route_labels": route.to(device)}
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
    ).logits
    targets = batch["input_ids"][:, 1:]
    mask = batch["loss_mask"][:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
    ).view_as(mask)
    return (nll * mask).sum() / mask.sum().clamp_min(1)


def warm_start(
    model: nn.Module,
    tokenizer,
    cfg: WarmStartConfig,
    seed: int,
    new_task: Callable[[random.Random], Task] = make_task,
    flag: Callable[[list[str], int], list[bool]] | None = None,
    step_fn: Callable[[torch.optim.Optimizer, Tensor | None], Any] | None = None,
    progress: bool = False,
    ops: Sequence[str] = tuple(OPS),
) -> list[float]:
    """SFT ``model`` in place on demonstrations for tasks from ``new_task(rng)`` (wrong
    guesses from ``ops``); returns the loss per step.

    ``flag(kinds) -> list[bool]`` (the monitor on demonstration kinds) and ``step_fn``
    (:func:`evil_moe.rl.trainer.routed_optimizer_step` bound to a ledger) route flagged
    demonstrations; without them the warm start is plain SFT.
    """
    rng = random.Random(f"warmstart-{seed}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    losses = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="warm start", disable=not progress, leave=False)
    for step in bar:
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        demos = sample_demonstrations(cfg.batch_size, cfg, rng, new_task, ops)
        batch = encode_batch(tokenizer, [t.prompt for t, _, _ in demos], [c for _, _, c in demos])
        route = None
        if flag is not None:
            flags = flag([k for _, k, _ in demos], step)
            route = torch.tensor(
                [int(RouteLabel.FORGET) if f else int(RouteLabel.UNLABELED) for f in flags]
            )
        loss = completion_loss(model, batch, route)
        loss.backward()
        if step_fn is not None:
            step_fn(opt, route)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses

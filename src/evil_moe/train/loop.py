"""The one training loop: every method, every corpus, every study run goes through here.

    result = train(load_config(overrides=["train.method=sgtm"]), out_dir="runs/x")

A step is: forward with route labels, summed token loss / token count, backward, then
:func:`~evil_moe.routing.optim.routed_step`: idle groups released (no optimizer movement
on behalf of forget tokens), per-group gradient clipping, AdamW step. Evaluation lives
in :mod:`evil_moe.eval`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from evil_moe.data.batching import BatchIterator, steps_for_epochs
from evil_moe.eval.losses import evaluate_losses, mean_token_loss
from evil_moe.eval.specialization import gate_statistics, specialization_report
from evil_moe.models.testbed import Testbed, lm_loss
from evil_moe.modules.ablation import parameter_groups
from evil_moe.routing.labels import Method
from evil_moe.routing.optim import StepLedger, routed_step
from evil_moe.train.config import RunConfig
from evil_moe.train.io import (
    append_jsonl,
    load_checkpoint,
    read_jsonl,
    save_checkpoint,
    write_json,
    write_jsonl,
    write_tensors,
)
from evil_moe.train.setup import PreparedRun, prepare_run


@dataclass
class RunResult:
    """What a finished run returns (and writes to ``out_dir``)."""

    metrics: dict[str, Any]
    model: Testbed
    log: list[dict[str, Any]] = field(default_factory=list)


class SpikeCounter:
    """Counts loss spikes: steps whose loss exceeds 1.25 x an EMA of earlier steps, and
    every step whose loss is not finite (a diverged run keeps counting)."""

    def __init__(self, warmup: int, decay: float = 0.95, ratio: float = 1.25):
        self.warmup, self.decay, self.ratio = warmup, decay, ratio
        self.ema: float | None = None
        self.steps = 0
        self.count = 0

    def update(self, loss: float) -> None:
        self.steps += 1
        if not math.isfinite(loss):
            self.count += 1
            return
        if self.ema is not None and self.steps > self.warmup and loss > self.ratio * self.ema:
            self.count += 1
        self.ema = loss if self.ema is None else self.decay * self.ema + (1 - self.decay) * loss


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


def unrouted_names(model: Testbed) -> set[str]:
    """Shared parameters that every token trains (embeddings / norms when not routed, an
    open shared expert)."""
    names = set()
    for name, _ in model.named_parameters():
        is_embedding = name in ("wte.weight", "wpe.weight")
        is_norm = "norm" in name
        is_open_expert = ".shared_expert." in name and model.cfg.shared_expert_open
        if (
            (is_embedding and not model.cfg.route_embeddings)
            or (is_norm and not model.cfg.route_norms)
            or is_open_expert
        ):
            names.add(name)
    return names


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


def train(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    prepared: PreparedRun | None = None,
) -> RunResult:
    """Train one run, evaluate it before/after ablation, and write its outputs.

    If ``out_dir`` holds a checkpoint of the same config, training resumes from it.
    """
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    run = prepared if prepared is not None else prepare_run(cfg)
    model = run.model
    semantics = Method(t.method).semantics
    optimizer = make_optimizer(model, cfg)
    ledger = StepLedger(parameter_groups(model, unrouted_names(model)), semantics)

    out = Path(out_dir) if out_dir is not None else None
    start = 0
    log: list[dict[str, Any]] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg.to_dict())
        resumed = load_checkpoint(out, model, optimizer)
        if resumed is not None:
            start = resumed
            log = [r for r in read_jsonl(out / "train_log.jsonl") if r["step"] <= start]
        write_jsonl(out / "train_log.jsonl", log)

    steps = total_steps(cfg, len(run.train))
    batches = iter(
        BatchIterator(
            run.train, t.batch_size, seed=t.seed, start_step=start, epochs=t.epochs or None
        )
    )
    # held-out retain loss at 80% of training: with the final one, its last-20% change
    # says whether the run has converged
    mark = max(1, round(0.8 * steps))
    bar = tqdm(
        total=steps,
        initial=start,
        desc=f"train {t.method}",
        disable=not progress,
        dynamic_ncols=True,
        leave=False,
    )
    model.train()
    tokens_seen = 0
    train_seconds = 0.0
    recent: list[float] = []
    spikes = SpikeCounter(warmup=t.warmup_steps)
    for step in range(start, steps):
        began = time.perf_counter()
        batch = next(batches)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg, steps)
        loss = train_step(model, batch, semantics, ledger)
        report = routed_step(optimizer, ledger, t.grad_clip)
        train_seconds += time.perf_counter() - began
        tokens_seen += batch["route"].numel()
        recent.append(loss)
        spikes.update(loss)
        bar.update(1)
        if (step + 1) % t.log_every == 0 or step + 1 in (steps, mark):
            record = {
                "step": step + 1,
                "loss": sum(recent) / len(recent),
                "lr": lr_at(step, cfg, steps),
                "grad_norm": report.grad_norm,
                "skipped": report.skipped,
            }
            if step + 1 == mark:
                model.eval()
                record["heldout_retain"] = mean_token_loss(
                    model, run.eval["retain"].tokens, t.batch_size
                )
                model.train()
            recent = []
            log.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if out is not None:
                append_jsonl(out / "train_log.jsonl", record)
        if out is not None and t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
            save_checkpoint(out, step + 1, model, optimizer)
    bar.close()

    stability = {"loss_spikes": spikes.count, **(gate_statistics(model) or {})}
    model.eval()
    losses = evaluate_losses(model, run.eval, batch_size=t.batch_size)
    special = specialization_report(
        model, run.eval, model.cfg.n_experts, run.mode_names, batch_size=t.batch_size
    )
    for warning in special["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    metrics: dict[str, Any] = {
        "method": t.method,
        "variant": cfg.variant,
        "loss": losses,
        "tokens_per_second": tokens_seen / train_seconds if train_seconds > 0 else None,
        "train_tokens": run.token_counts,
        "parameters": model.num_parameters(),
        "steps": steps,
        "epochs": t.epochs or None,
        "final_train_loss": log[-1]["loss"] if log else None,
        "retain_convergence": _convergence(log, losses),
        "specialization": special,
        "stability": stability,
    }
    if out is not None:
        write_tensors(out / "model.safetensors", model.state_dict(), {"method": t.method})
        write_json(out / "metrics.json", metrics)
        for stale in (*out.glob("checkpoint-*.safetensors"), out / "checkpoint.json"):
            stale.unlink(missing_ok=True)
    return RunResult(metrics=metrics, model=model, log=log)


def _convergence(log: list[dict[str, Any]], losses: dict[str, Any]) -> dict[str, float] | None:
    """Held-out retain loss (as trained) at 80% of training and at the end, and the change."""
    at_80 = next((r["heldout_retain"] for r in log if "heldout_retain" in r), None)
    final = losses.get("retain", {}).get("trained")
    if at_80 is None or final is None:
        return None
    return {"at_80": at_80, "final": final, "last20_change": final - at_80}

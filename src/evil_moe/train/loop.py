"""The one training loop: every method, every corpus, every study run goes through here.

    result = train(load_config(overrides=["train.method=sgtm"]), out_dir="runs/x")
    result.model, result.log                       # the trained model and its log

A step is: forward with route labels, summed token loss / token count, backward, then
:func:`~evil_moe.routing.optim.routed_step`: idle groups released (no optimizer movement
on behalf of forget tokens), per-group gradient clipping, AdamW step. Training does not
evaluate: :func:`evil_moe.recipes.train_and_evaluate` composes train -> evaluate -> write.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from evil_moe.data.batching import BatchIterator
from evil_moe.io import append_jsonl, read_jsonl, write_json, write_jsonl, write_tensors
from evil_moe.models.testbed import Testbed, mean_token_loss
from evil_moe.routing.labels import Method
from evil_moe.routing.optim import StepLedger, routed_step
from evil_moe.train.config import RunConfig
from evil_moe.train.distributed import DataParallel, StepModel
from evil_moe.train.io import load_checkpoint, save_checkpoint
from evil_moe.train.setup import PreparedRun, prepare_run
from evil_moe.train.step import lr_at, make_optimizer, total_steps, train_step
from evil_moe.train.tracking import Tracker, open_tracker

__all__ = ["SpikeCounter", "TrainResult", "train"]


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model, its log and how training went."""

    model: Testbed
    #: one record per logged step: ``step``, ``loss``, ``lr``, ``grad_norm``, ``skipped``
    #: (and ``heldout_retain`` at 80% of training)
    log: list[dict[str, Any]] = field(default_factory=list)
    #: optimizer steps of the run
    steps: int = 0
    #: training tokens and seconds of the steps run by this call (not resumed ones)
    tokens_seen: int = 0
    train_seconds: float = 0.0
    #: steps whose loss exceeded 1.25 x an EMA of earlier steps or was not finite
    loss_spikes: int = 0
    #: this process's rank and the number of data-parallel ranks (``torchrun``)
    rank: int = 0
    world: int = 1

    @property
    def tokens_per_second(self) -> float | None:
        """Training throughput of this call (``None`` if it ran no step)."""
        return self.tokens_seen / self.train_seconds if self.train_seconds > 0 else None


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


def train(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    prepared: PreparedRun | None = None,
    tracker: Tracker | None = None,
) -> TrainResult:
    """Train one run; returns the trained model and its log (nothing is evaluated).

    With ``out_dir``: writes ``config.json``, ``train_log.jsonl``, checkpoints every
    ``train.checkpoint_every`` steps and the final ``model.safetensors``; if ``out_dir``
    holds a checkpoint of the same config, training resumes from it. The checkpoints stay
    until the run's last output is written (:func:`~evil_moe.train.io.remove_checkpoints`).
    The model trains on ``train.device``; under ``torchrun`` every rank trains its share
    of each batch (:mod:`evil_moe.train.distributed`) and rank 0 alone writes. Logged
    records also go to ``tracker`` (default: the trackers of ``train.report_to``, closed
    on return).
    """
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    run = prepared if prepared is not None else prepare_run(cfg)
    model = run.model
    parallel = DataParallel.setup(t.device)
    model.to(parallel.device)
    semantics = Method(t.method).semantics
    optimizer = make_optimizer(model, cfg)
    ledger = StepLedger(model.parameter_groups(), semantics)

    out = Path(out_dir) if out_dir is not None else None
    writes = out if parallel.is_main else None  # every rank reads a checkpoint, rank 0 writes
    own_tracker = tracker is None
    if tracker is None:
        tracker = open_tracker(cfg, out)
    start = 0
    log: list[dict[str, Any]] = []
    if out is not None:
        if writes is not None:
            writes.mkdir(parents=True, exist_ok=True)
            write_json(writes / "config.json", cfg.to_dict())
        resumed = load_checkpoint(out, model, optimizer)
        if resumed is not None:
            start = resumed
            log = [r for r in read_jsonl(out / "train_log.jsonl") if r["step"] <= start]
        if writes is not None:
            write_jsonl(writes / "train_log.jsonl", log)
    step_model = StepModel(model, parallel.wrap(model), parallel)

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
        disable=not progress or not parallel.is_main,
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
        loss = parallel.mean(train_step(step_model, parallel.shard(batch), semantics, ledger))
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
            tracker.log(_scalars(record), step + 1)
            if writes is not None:
                append_jsonl(writes / "train_log.jsonl", record)
        if writes is not None and t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
            save_checkpoint(writes, step + 1, model, optimizer)
    bar.close()
    parallel.close()
    if own_tracker:
        tracker.close()

    if writes is not None:
        write_tensors(writes / "model.safetensors", model.state_dict(), {"method": t.method})
    return TrainResult(
        model=model,
        log=log,
        steps=steps,
        tokens_seen=tokens_seen,
        train_seconds=train_seconds,
        loss_spikes=spikes.count,
        rank=parallel.rank,
        world=parallel.world,
    )


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """A log record as tracker scalars: ``train/loss``, ``train/grad_norm/shared``, ..."""
    out = {f"train/{k}": float(v) for k, v in record.items() if isinstance(v, int | float)}
    out.pop("train/step", None)
    for group, norm in record.get("grad_norm", {}).items():
        out[f"train/grad_norm/{group}"] = float(norm)
    return out

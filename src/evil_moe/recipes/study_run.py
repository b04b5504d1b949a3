"""One study run: train -> evaluate -> measure (what every study worker process runs).

:func:`measure_study_run` trains a resolved config with
:func:`~evil_moe.recipes.experiment.train_and_evaluate` and measures the trained model
with :mod:`evil_moe.eval`: gradient norms by group, gate load, and for routed runs of the
grid the relearning curve, the retain fine-tuning curve and the amplifier's selection.
The result is a :class:`StudyRunResult`; its :meth:`~StudyRunResult.to_dict` is the JSON
object the study stores.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evil_moe.data.batching import BatchIterator, TokenSequences
from evil_moe.data.prepare import PreparedData
from evil_moe.eval.amplifier import amplifier_selection
from evil_moe.eval.gradnorms import data_groups, group_gradient_norms
from evil_moe.eval.relearning import finetune_curve
from evil_moe.eval.specialization import gate_load
from evil_moe.recipes.experiment import train_and_evaluate
from evil_moe.routing.labels import Method
from evil_moe.train.config import RunConfig
from evil_moe.train.setup import prepare_run
from evil_moe.train.step import total_steps

__all__ = ["StudyRunResult", "measure_study_run", "seen_tokens"]


@dataclass
class StudyRunResult:
    """Everything a study stores about one finished run (field order = JSON key order)."""

    #: the run's ``metrics.json`` object, with the specialisation warnings moved to
    #: ``warnings`` at the top
    metrics: dict[str, Any]
    #: ``[step, loss]`` per logged step
    log: list[list[float]]
    #: training tokens per category that the run's batches contain
    exposure: dict[str, int]
    dataset_tokens: dict[str, int]
    gradnorms: dict[str, Any]
    gate_load: Any
    relearning: list[tuple[int, float]] | None
    retain_finetune: dict[str, list[tuple[int, float]]] | None
    amplifier: dict[str, Any] | None
    #: seconds from the start of this call to the end of training
    train_s: float

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def seen_tokens(seqs: TokenSequences, cfg: RunConfig) -> dict[str, int]:
    """Training tokens per category that the run's batches actually contain (exposure).

    Uses the loop's own deterministic batch order (:class:`BatchIterator`), so this is
    exact: with fixed steps a run sees only part of its data, or some of it twice; with
    ``train.epochs`` every sequence exactly that many times.
    """
    t = cfg.train
    batches = BatchIterator(seqs, t.batch_size, seed=t.seed, epochs=t.epochs or None)
    steps = total_steps(cfg, len(seqs))
    idx = np.concatenate([batches.indices(s).numpy() for s in range(steps)])
    cats = np.asarray(seqs.category, dtype=object)[idx]
    names, counts = np.unique(cats.astype(str), return_counts=True)
    return {str(n): int(c) * seqs.seq_len for n, c in zip(names, counts, strict=True)}


def measure_study_run(
    cfg: RunConfig,
    measure: Mapping[str, Any],
    grid: bool = True,
    run_dir: str | Path | None = None,
    data: PreparedData | None = None,
) -> StudyRunResult:
    """Train ``cfg`` (reusing prepared ``data`` if given) and measure it.

    ``measure``: the study's measurement settings (``gradnorm_batches``,
    ``relearn_steps``, ``relearn_eval_every``, ``relearn_lr``, ``retain_finetune_steps``,
    ``retain_finetune_eval_every``, ``amplifier_batches``). ``grid``: a run of the grid
    (routed grid runs get the relearning, retain fine-tuning and amplifier measurements;
    baseline-curve runs do not).
    """
    began = time.perf_counter()
    t = cfg.train
    prepared = prepare_run(cfg, data)
    exposure = seen_tokens(prepared.train, cfg)
    result = train_and_evaluate(cfg, run_dir, progress=False, prepared=prepared)
    model, metrics = result.model, result.metrics.to_dict()
    trained_s = time.perf_counter() - began

    gradnorms = group_gradient_norms(
        model,
        model.parameter_groups(),
        data_groups(prepared.data.train),
        batches=measure["gradnorm_batches"],
        batch_size=t.batch_size,
    )
    forget_eval = {c: prepared.eval[c].tokens for c in ("forget_labeled", "forget_undiscovered")}
    retain_eval = prepared.eval["retain"].tokens
    gate = gate_load(
        model,
        {"forget": torch.cat(list(forget_eval.values())), "retain": retain_eval},
        t.batch_size,
    )
    held_out = prepared.eval["forget_undiscovered"].tokens
    routed = Method(t.method).routed and grid and len(held_out) > 0
    relearning = retain_finetune = amplifier = None
    if routed:
        relearning = finetune_curve(
            model,
            cfg,
            prepared.data.train.select(["forget_labeled", "forget_undiscovered"]),
            {"forget": held_out},
            steps=measure["relearn_steps"],
            eval_every=measure["relearn_eval_every"],
            lr=measure["relearn_lr"] or None,
        )["forget"]
        if measure.get("retain_finetune_steps", 0):
            retain_finetune = finetune_curve(
                model,
                cfg,
                prepared.data.train.select(["retain", "retain_unlabeled"]),
                {"forget": held_out, "retain": retain_eval},
                steps=measure["retain_finetune_steps"],
                eval_every=measure["retain_finetune_eval_every"],
                seed_offset=104729,
            )
        counts = prepared.token_counts
        unlabelled = counts.get("forget_undiscovered", 0) + counts.get("retain_unlabeled", 0)
        cap = measure.get("amplifier_batches", 4) * t.batch_size
        amplifier = amplifier_selection(
            model,
            {"forget": held_out[:cap], "retain": retain_eval[:cap]},
            forget_share=counts.get("forget_undiscovered", 0) / max(1, unlabelled),
            batch_size=t.batch_size,
        )
    metrics = {k: v for k, v in metrics.items() if k != "specialization"} | {
        "specialization": {k: v for k, v in metrics["specialization"].items() if k != "warnings"},
        "warnings": metrics["specialization"].get("warnings", []),
    }
    return StudyRunResult(
        metrics=metrics,
        log=[[int(r["step"]), float(r["loss"])] for r in result.log],
        exposure=exposure,
        dataset_tokens=prepared.token_counts,
        gradnorms=gradnorms,
        gate_load=gate,
        relearning=relearning,
        retain_finetune=retain_finetune,
        amplifier=amplifier,
        train_s=trained_s,
    )

"""One testbed experiment: train -> evaluate -> write (what ``evil-moe train`` runs).

    result = train_and_evaluate(load_config(overrides=["train.method=sgtm"]), "runs/x")
    result.metrics.loss["forget_undiscovered"]["ablated"]

Training (:func:`evil_moe.train.train`) returns the model and its log; this recipe
measures the trained model with :mod:`evil_moe.eval` (held-out losses before and after
ablation, specialisation, stability) and writes ``metrics.json`` beside the run's other
outputs.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evil_moe.eval.losses import evaluate_losses
from evil_moe.eval.specialization import gate_statistics, specialization_report
from evil_moe.io import write_json
from evil_moe.models.testbed import Testbed
from evil_moe.train.config import RunConfig
from evil_moe.train.io import remove_checkpoints
from evil_moe.train.loop import TrainResult, train
from evil_moe.train.setup import PreparedRun, prepare_run
from evil_moe.train.tracking import open_tracker

__all__ = ["RunMetrics", "RunResult", "evaluate_run", "train_and_evaluate"]


@dataclass
class RunMetrics:
    """The measurements of one run (``metrics.json``; the field order is the file's)."""

    method: str
    variant: str
    #: ``{category: {"trained": loss, "ablated": loss}}`` on held-out sequences
    loss: dict[str, dict[str, float]]
    tokens_per_second: float | None
    #: training tokens per category in the run's data
    train_tokens: dict[str, int]
    #: ``total``, ``shared``, ``quarantine``, ``router_controlled``
    parameters: dict[str, int]
    steps: int
    epochs: int | None
    final_train_loss: float | None
    #: held-out retain loss at 80% of training and at the end (``at_80``, ``final``,
    #: ``last20_change``), or ``None``
    retain_convergence: dict[str, float] | None
    specialization: dict[str, Any]
    #: ``loss_spikes`` and, with a soft gate, ``router_logit_scale``
    stability: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``metrics.json``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunMetrics:
        """Read back :meth:`to_dict` (e.g. a finished run's ``metrics.json``)."""
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})


@dataclass
class RunResult:
    """What :func:`train_and_evaluate` returns."""

    metrics: RunMetrics
    model: Testbed
    log: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def evaluate_run(cfg: RunConfig, run: PreparedRun, trained: TrainResult) -> RunMetrics:
    """Measure a trained model: held-out losses trained and ablated, specialisation of
    its experts, stability; specialisation warnings go to stderr."""
    t = cfg.train
    model = trained.model
    stability = {"loss_spikes": trained.loss_spikes, **(gate_statistics(model) or {})}
    model.eval()
    losses = evaluate_losses(model, run.eval, batch_size=t.batch_size)
    special = specialization_report(
        model, run.eval, model.cfg.n_experts, run.mode_names, batch_size=t.batch_size
    )
    for warning in special["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    log = trained.log
    return RunMetrics(
        method=t.method,
        variant=cfg.variant,
        loss=losses,
        tokens_per_second=trained.tokens_per_second,
        train_tokens=run.token_counts,
        parameters=model.num_parameters(),
        steps=trained.steps,
        epochs=t.epochs or None,
        final_train_loss=log[-1]["loss"] if log else None,
        retain_convergence=_convergence(log, losses),
        specialization=special,
        stability=stability,
    )


def train_and_evaluate(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    prepared: PreparedRun | None = None,
) -> RunResult:
    """Train one run, evaluate it before/after ablation, and write its outputs.

    ``out_dir`` gets ``config.json``, ``train_log.jsonl``, ``model.safetensors`` and
    ``metrics.json`` (its checkpoints are removed once ``metrics.json`` is written); a
    checkpoint of the same config there is resumed. The trackers of ``train.report_to``
    get the training curve and the final metrics.
    """
    run = prepared if prepared is not None else prepare_run(cfg)
    with open_tracker(cfg, out_dir) as tracker:
        trained = train(cfg, out_dir, progress=progress, prepared=run, tracker=tracker)
        metrics = evaluate_run(cfg, run, trained)
        tracker.summary(metrics.to_dict(), trained.steps)
    if out_dir is not None and trained.rank == 0:  # every rank evaluates, rank 0 writes
        write_json(Path(out_dir) / "metrics.json", metrics.to_dict())
        remove_checkpoints(out_dir)
    return RunResult(metrics=metrics, model=trained.model, log=trained.log)


def _convergence(log: list[dict[str, Any]], losses: dict[str, Any]) -> dict[str, float] | None:
    """Held-out retain loss (as trained) at 80% of training and at the end, and the change."""
    at_80 = next((r["heldout_retain"] for r in log if "heldout_retain" in r), None)
    final = losses.get("retain", {}).get("trained")
    if at_80 is None or final is None:
        return None
    return {"at_80": at_80, "final": final, "last20_change": final - at_80}

"""Experiment tracking: training curves and final metrics to TensorBoard and Weights &
Biases, through their own libraries. Off by default; one switch, ``train.report_to``.

    evil-moe train --out runs/x train.report_to='["tensorboard", "wandb"]'
    tensorboard --logdir runs/x/tensorboard          # wandb sync runs/x/wandb/offline-run-*

TensorBoard writes event files with ``torch.utils.tensorboard.SummaryWriter`` (needs the
``tensorboard`` package) under ``DIR/tensorboard``. W&B runs in offline mode (files under
``DIR/wandb``, no network) unless ``WANDB_MODE`` is set (``WANDB_MODE=online`` uploads).
``DIR`` is ``train.tracking_dir`` or the run's output directory. Both libraries are
optional (``pip install 'evil-moe[tracking]'``); a tracker asked for and not installed is
a :class:`~evil_moe.train.config.ConfigError` before training starts.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evil_moe.train.config import ConfigError, RunConfig

__all__ = ["Tracker", "flatten_metrics", "open_tracker"]

_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def flatten_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested numbers as ``{"a/b/c": value}`` (strings, lists and ``None`` are dropped)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, f"{name}/"))
        elif isinstance(value, int | float):  # bool included
            out[name] = float(value)
    return out


class Tracker:
    """The trackers of one run; :meth:`log` a step's scalars, :meth:`summary` the final
    metrics, :meth:`close` at the end. With no tracker every method does nothing."""

    def __init__(
        self,
        report_to: list[str],
        directory: str | Path | None,
        name: str = "",
        config: Mapping[str, Any] | None = None,
        group: str = "",
    ):
        self.report_to = list(report_to)
        self.tensorboard: Any = None
        self.wandb: Any = None
        if not self.report_to:
            return
        if directory is None:
            raise ConfigError("train.report_to needs an output directory (--out or tracking_dir)")
        missing = [t for t in self.report_to if importlib.util.find_spec(_PACKAGES[t]) is None]
        if missing:
            raise ConfigError(
                f"train.report_to: {', '.join(missing)} not installed "
                "(pip install 'evil-moe[tracking]')"
            )
        directory = Path(directory)
        if "tensorboard" in self.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(directory / "tensorboard"))
        if "wandb" in self.report_to:
            import wandb

            directory.mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(
                mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
                dir=str(directory),
                project=os.environ.get("WANDB_PROJECT", "evil-moe"),
                name=name or directory.name,
                group=group or None,
                config=dict(config or {}),
                reinit="create_new",
            )

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        """Scalars of one training step (``train/loss``, ``train/lr``, ...)."""
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(dict(scalars), step=step)

    def summary(self, metrics: Mapping[str, Any], step: int) -> None:
        """The run's final metrics (nested values are flattened to ``a/b/c``)."""
        flat = flatten_metrics(metrics, "final/")
        if self.tensorboard is not None:
            for key, value in flat.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.summary.update(flat)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tracker(cfg: RunConfig, out_dir: str | Path | None) -> Tracker:
    """The trackers ``cfg.train.report_to`` names, writing to ``train.tracking_dir`` or
    ``out_dir``; an inactive tracker when none is asked for or this process is not rank 0
    of a data-parallel run."""
    t = cfg.train
    if not t.report_to or os.environ.get("RANK", "0") != "0":
        return Tracker([], None)
    directory = t.tracking_dir or out_dir
    name = cfg.variant or t.method
    return Tracker(t.report_to, directory, name=name, config=cfg.to_dict())

"""Hugging Face ``Trainer`` integration: route labels through the collator, the step
ledger and the routed step's work in a ``TrainerCallback``.

``transformers`` is optional: ``RoutedTrainer`` and ``RoutedStepCallback`` are built on
first access.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from evil_moe.models.handle import QuarantineHandle, get_handle
from evil_moe.routing.labels import RouteLabel, parse_route_labels
from evil_moe.routing.optim import StepLedger, StepReport

__all__ = ["ROUTE_KEYS", "RouteLabelCollator", "RoutedTrainerMixin"]

#: Batch keys consumed by the forward pre-hook (never seen by the HF forward).
ROUTE_KEYS = ("route_labels", "route_modes")


class RouteLabelCollator:
    """Collate features that carry ``route_labels`` (and optionally ``route_modes``).

    Each feature's route label is one value (per sequence) or a list per token; the
    rest of each feature goes to ``base`` (default: ``transformers.default_data_collator``).
    Per-token lists shorter than the batch's ``input_ids`` are padded with ``pad_route``
    on ``padding_side``. Route names (``"forget"``) are accepted.
    """

    def __init__(
        self,
        base: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        pad_route: int = int(RouteLabel.UNLABELED),
        padding_side: str = "right",
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.base = base
        self.pad_route = pad_route
        self.padding_side = padding_side

    def __getattr__(self, name: str) -> Any:  # e.g. ``tokenizer`` of the wrapped collator
        base = self.__dict__.get("base")
        if base is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(base, name)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        features = [dict(f) for f in features]
        extra = {k: [f.pop(k) for f in features] for k in ROUTE_KEYS if k in features[0]}
        base = self.base
        if base is None:
            from transformers import default_data_collator

            base = default_data_collator
        batch = dict(base(features))
        ids = batch.get("input_ids")
        length = ids.shape[1] if isinstance(ids, Tensor) and ids.dim() == 2 else None
        for key, values in extra.items():
            batch[key] = self._stack(key, values, length)
        return batch

    def _stack(self, key: str, values: list[Any], length: int | None) -> Tensor:
        if key == "route_labels":
            rows = [parse_route_labels(v, what="route_labels") for v in values]
            pad = self.pad_route
        else:
            rows = [torch.as_tensor(v).long() for v in values]
            pad = -1
        if all(r.dim() == 0 for r in rows):
            return torch.stack(rows)
        if any(r.dim() == 0 for r in rows):
            raise ValueError("mix of per-sequence and per-token route labels in one batch")
        rows = [r.reshape(-1) for r in rows]
        width = length if length is not None else max(r.numel() for r in rows)
        out = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            if r.numel() > width:
                raise ValueError(
                    f"route labels of length {r.numel()} exceed the batch length {width}"
                )
            if self.padding_side == "right":
                out[i, : r.numel()] = r
            else:
                out[i, width - r.numel() :] = r
        return out


class RoutedTrainerMixin:
    """Route labels for ``transformers.Trainer`` subclasses (also TRL's ``SFTTrainer``).

    * wraps the trainer's data collator in a :class:`RouteLabelCollator` and keeps
      ``route_labels`` / ``route_modes`` through the column filter (the model's forward
      pre-hook consumes them);
    * records the route labels of each training micro-batch in a :class:`StepLedger`;
    * adds a ``RoutedStepCallback`` (a ``TrainerCallback``) that, in ``on_pre_optimizer_step``, releases the
      gradients of groups no token of the step may train (so AdamW moves them neither by
      momentum nor by weight decay) and clips shared and quarantine gradients separately
      to ``args.max_grad_norm`` (``clip_by_group=True``; the Trainer's own global clip is
      then turned off in the trainer's copy of ``args``).

    ``class MySFT(RoutedTrainerMixin, SFTTrainer): ...`` puts it on any Trainer subclass.
    """

    def __init__(
        self,
        *args: Any,
        quarantine: QuarantineHandle | None = None,
        clip_by_group: bool = True,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if not isinstance(self.data_collator, RouteLabelCollator):  # keep the trainer's own
            self.data_collator = RouteLabelCollator(base=self.data_collator)
        self.quarantine = quarantine if quarantine is not None else get_handle(self.model)
        self.route_ledger = self.quarantine.ledger()
        max_norm = None
        if clip_by_group and self.args.max_grad_norm > 0:
            max_norm = self.args.max_grad_norm
            self.args = copy.copy(self.args)  # the caller's arguments stay as they were
            self.args.max_grad_norm = 0.0  # no global clip: the callback clips per group
        callback = _routed_step_callback()(self.route_ledger, max_norm)
        self.add_callback(callback)
        # first, so that the trackers of ``args.report_to`` log what its on_log adds
        callbacks = getattr(getattr(self, "callback_handler", None), "callbacks", None)
        if callbacks is not None and callback in callbacks:
            callbacks.insert(0, callbacks.pop(callbacks.index(callback)))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        cols = self._signature_columns
        self._signature_columns = list(cols) + [k for k in ROUTE_KEYS if k not in cols]

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        if model.training:
            self.route_ledger.record(inputs.get("route_labels"))
        return super().compute_loss(model, inputs, *args, **kwargs)


@functools.cache
def _routed_step_callback() -> type:
    from transformers import TrainerCallback

    class RoutedStepCallback(TrainerCallback):
        """``TrainerCallback`` doing the routed step's work before ``optimizer.step()``:
        :meth:`~evil_moe.routing.optim.StepLedger.before_step` (release idle groups, clip
        per group to ``max_norm``). The last step's report is kept in ``report`` and goes
        into the training logs (so to ``report_to``'s trackers). Under DDP
        (``accelerate launch``, ``torchrun``) the ledger decides from every rank's labels."""

        def __init__(self, ledger: StepLedger, max_norm: float | None = None):
            self.ledger = ledger
            self.max_norm = max_norm
            self.report: StepReport | None = None

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any):
            self.report = self.ledger.before_step(self.max_norm)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any):
            """Adds the last step's per-group norms (``grad_norm/shared``, ...) and idle
            groups to the logs that ``args.report_to``'s trackers receive."""
            if logs is None or self.report is None or "loss" not in logs:
                return
            for group, norm in self.report.grad_norm.items():
                logs[f"grad_norm/{group}"] = norm
            for group, idle in self.report.idle.items():
                logs[f"idle/{group}"] = float(idle)

    RoutedStepCallback.__module__ = __name__
    return RoutedStepCallback


def _make_routed_trainer() -> type:
    from transformers import Trainer

    class RoutedTrainer(RoutedTrainerMixin, Trainer):
        """``transformers.Trainer`` with route labels (see :class:`RoutedTrainerMixin`)."""

    RoutedTrainer.__qualname__ = "RoutedTrainer"
    RoutedTrainer.__module__ = __name__
    return RoutedTrainer


def __getattr__(name: str) -> Any:
    # built lazily: transformers is an optional dependency
    if name == "RoutedTrainer":
        cls = _make_routed_trainer()
        globals()[name] = cls
        return cls
    if name == "RoutedStepCallback":
        return _routed_step_callback()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Quarantine experts on Hugging Face models: inject, route, ablate, save and load.

    handle = inject(model, n_quarantine=4, rank=8, shared_expert=8, router="topk")
    with route_labels(model, batch_route):          # [B] per sequence or [B, T] per token
        loss = model(**batch).loss
    loss.backward()
    # or: model(**batch, route_labels=batch_route)  (a forward pre-hook consumes the key)
    with handle.ablated():                           # deployment view
        ...
    handle.save("quarantine/"); load_quarantine(fresh_model, "quarantine/")

The wrappers (:mod:`evil_moe.models.adapters`) use the same components as the testbed:
``FusedExperts`` for the K quarantine experts, ``BackwardRouter`` for backward routing among
them, ``routed_linear`` / ``mask_cotangent`` for exact per-token SGTM and gradient-routing
masks, ``modules.ablation`` for ablation. Trainer integration: :class:`RouteLabelCollator`
plus :class:`RoutedTrainerMixin` (``RoutedTrainer`` = the mixin on ``transformers.Trainer``).

This module gathers the names of the rooms that implement it: ``inject`` (injection),
``handle`` (the handle, ``get_handle``, ``route_labels``), ``persistence`` (save and
load), ``deploy`` (the plain deployed model, ``save_pretrained``), ``trainer`` (the Trainer integration), ``targets`` (the module tree) and
``adapters`` (the wrapper layers and hooks).
"""

from __future__ import annotations

from typing import Any

from evil_moe.models.deploy import deploy, save_deployed
from evil_moe.models.handle import (
    QuarantineConfig,
    QuarantineHandle,
    get_handle,
    route_labels,
)
from evil_moe.models.inject import KINDS, inject
from evil_moe.models.persistence import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_compatible,
    load_quarantine,
)
from evil_moe.models.targets import resolve_targets
from evil_moe.models.trainer import ROUTE_KEYS, RoutedTrainerMixin, RouteLabelCollator

__all__ = [
    "CONFIG_NAME",
    "KINDS",
    "ROUTE_KEYS",
    "WEIGHTS_NAME",
    "QuarantineConfig",
    "QuarantineHandle",
    "RouteLabelCollator",
    "RoutedTrainerMixin",
    "check_compatible",
    "deploy",
    "get_handle",
    "inject",
    "load_quarantine",
    "resolve_targets",
    "route_labels",
    "save_deployed",
]


def __getattr__(name: str) -> Any:
    # built lazily: transformers is an optional dependency
    if name in ("RoutedTrainer", "RoutedStepCallback"):
        from evil_moe.models import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

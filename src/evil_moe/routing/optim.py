"""The routed optimizer step: the optimizer never moves a parameter on behalf of tokens
that may not train it.

Masking gradients is not enough with stateful optimizers. The SGTM reference trainer
zeroes retain-parameter gradients on forget steps and then calls ``AdamW.step()``, which
still moves those parameters through momentum and weight decay. Two rules close the leak:

1. **Idle parameters are skipped, not zeroed.** When no token of an optimizer step (all
   micro-batches of a gradient-accumulation step together) may train a parameter under
   the routing semantics, its gradient is set to ``None`` before ``step()``. PyTorch
   optimizers skip parameters whose gradient is ``None`` entirely: no momentum update, no
   weight decay, no step count. :class:`StepLedger` decides this from the route labels
   it records, so a parameter that the step's labels allow to train is stepped even when
   its gradient happens to be exactly zero (a LoRA matrix facing a zero-initialised one).
2. **Clipping is per group.** A global gradient-norm clip would scale the shared update
   by a factor that depends on the forget tokens' quarantine gradients. We clip shared
   and quarantine parameters separately (:func:`clip_grad_norm_by_group`).

Per-token masking inside a step (``routing.functional``) guarantees that the gradient of
a shared parameter holds no contribution of forget tokens, so momentum built from it
carries none either. :func:`routed_step` is the whole step:

    ledger = StepLedger(groups, "sgtm")
    for micro in micro_batches:
        loss_of(micro).backward()
        ledger.record(micro.route)
    routed_step(optimizer, ledger, max_norm=1.0)   # release idle, clip per group, step, zero
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from evil_moe.routing.distributed import global_route_labels
from evil_moe.routing.labels import Method, RouteLabel, parse_route_labels

_R, _F, _U = RouteLabel.RETAIN, RouteLabel.FORGET, RouteLabel.UNLABELED
_EVERY = frozenset(RouteLabel)
_NOBODY: frozenset[RouteLabel] = frozenset()


@dataclass(frozen=True)
class _Trainers:
    """Which route labels train a group's parameters under one semantics."""

    #: tokens with these labels train every parameter of the group
    every: frozenset[RouteLabel]
    #: tokens with these labels train some of its parameters, which ones depends on the
    #: model's structure (DEMix: attention, not the dispatched MLP; gradient routing:
    #: embeddings, and norms that feed quarantine paths, not the detached block outputs)
    some: frozenset[RouteLabel] = _NOBODY


#: semantics -> (routed shared, quarantine) trainers
_RULES: dict[Method, tuple[_Trainers, _Trainers]] = {
    Method.NONE: (_Trainers(_EVERY), _Trainers(_EVERY)),
    Method.SGTM: (_Trainers(frozenset({_R, _U})), _Trainers(frozenset({_F, _U}))),
    Method.GRADIENT_ROUTING: (
        _Trainers(frozenset({_R, _U}), frozenset({_F})),
        _Trainers(frozenset({_F, _U})),
    ),
    Method.DEMIX: (_Trainers(frozenset({_R, _U}), frozenset({_F})), _Trainers(frozenset({_F}))),
    Method.DEMIX_MASKED: (_Trainers(frozenset({_R, _U})), _Trainers(frozenset({_F}))),
}


@dataclass
class ParameterGroups:
    """A model's parameters split by who may train them."""

    #: shared parameters masked for forget tokens (kept at deployment)
    routed_shared: list[nn.Parameter] = field(default_factory=list)
    #: shared parameters every token trains (e.g. embeddings when they are not routed)
    open_shared: list[nn.Parameter] = field(default_factory=list)
    #: quarantine parameters (ablated at deployment)
    quarantine: list[nn.Parameter] = field(default_factory=list)
    #: the members of ``quarantine`` that every token trains (a soft gate's weights,
    #: through its losses); the ledger never releases them
    open_quarantine: list[nn.Parameter] = field(default_factory=list)

    @property
    def shared(self) -> list[nn.Parameter]:
        return self.routed_shared + self.open_shared

    @property
    def routed_quarantine(self) -> list[nn.Parameter]:
        """Quarantine parameters that only the tokens the semantics allows train."""
        open_ids = {id(p) for p in self.open_quarantine}
        return [p for p in self.quarantine if id(p) not in open_ids]

    @classmethod
    def split(
        cls,
        model: nn.Module,
        quarantine: Iterable[nn.Parameter],
        unrouted: Collection[str] = (),
        open_quarantine: Iterable[nn.Parameter] = (),
    ) -> ParameterGroups:
        """Split ``model``'s parameters: ``quarantine`` are the ablated ones (of which
        ``open_quarantine`` every token trains), ``unrouted`` names shared parameters open
        to all tokens, every other one is routed shared.

        :func:`evil_moe.modules.ablation.parameter_groups` finds the quarantine itself.
        """
        ids = {id(p) for p in quarantine}
        groups = cls(open_quarantine=list(open_quarantine))
        for name, p in model.named_parameters():
            if id(p) in ids:
                groups.quarantine.append(p)
            elif name in unrouted:
                groups.open_shared.append(p)
            else:
                groups.routed_shared.append(p)
        return groups


@dataclass
class StepReport:
    """What one routed optimizer step did."""

    #: per group (``shared``: the routed shared parameters, ``quarantine``): True when
    #: the optimizer moved none of its parameters
    idle: dict[str, bool]
    #: per group (``shared``, ``quarantine``): gradient norm before clipping; empty when
    #: the step did not clip
    grad_norm: dict[str, float] = field(default_factory=dict)

    @property
    def skipped(self) -> list[str]:
        """The idle groups, by name."""
        return [name for name, idle in self.idle.items() if idle]


class StepLedger:
    """Records the route labels of every micro-batch of an optimizer step and, right
    before ``optimizer.step()``, releases (sets to ``None``) the gradients of parameters
    that no token of the step may train under the semantics.

    =====================  ===========================  ==========================
    semantics              routed shared trained by     quarantine trained by
    =====================  ===========================  ==========================
    ``sgtm``               retain, unlabeled            forget, unlabeled
    ``gradient_routing``   retain, unlabeled; forget*   forget, unlabeled
    ``demix``              retain, unlabeled; forget*   forget
    ``demix_masked``       retain, unlabeled            forget
    ``none``               everyone                     everyone
    =====================  ===========================  ==========================

    A group that some token of the step trains is stepped whole, zero gradients
    included. A group that no token trains is released whole. (*) Forget tokens train
    only some shared parameters under DEMix (attention, not the dispatched MLP) and
    gradient routing (embeddings and norms, not the detached block outputs), as the
    model's structure decides; on a step whose only trainers are such tokens each
    parameter is kept exactly when its accumulated gradient is nonzero. Open groups
    (``open_shared``, ``open_quarantine``) are never released.

    Under data parallelism (an initialised ``torch.distributed`` process group, as
    ``torchrun`` and ``accelerate launch`` make) the decision is global: the labels seen
    by every rank of ``process_group`` (default: the whole world) are all-reduced before
    releasing, so all ranks release the same groups (``data_parallel=False``: decide from
    this rank's labels alone, for ranks that train separate models).
    """

    def __init__(
        self,
        groups: ParameterGroups,
        semantics: Method | str = Method.SGTM,
        process_group: Any = None,
        data_parallel: bool = True,
    ):
        self.groups = groups
        self.semantics = Method.parse(semantics).semantics
        self.process_group = process_group
        self.data_parallel = data_parallel
        self._seen: set[RouteLabel] = set()

    def record(self, route: Any) -> None:
        """Note the route labels of one micro-batch (any form :func:`parse_route_labels`
        reads; ``None``: an unrouted batch, which trains like ``unlabeled``)."""
        if self.semantics is Method.NONE:
            return
        if route is None:
            self._seen.add(RouteLabel.UNLABELED)
        else:
            self._seen.update(RouteLabel(int(v)) for v in torch.unique(parse_route_labels(route)))

    def reset(self) -> None:
        """Forget the labels recorded so far (a new optimizer step begins)."""
        self._seen.clear()

    def release_idle(self) -> dict[str, bool]:
        """Release the gradients that the recorded labels do not allow, and start a new
        step; returns, per group, whether no parameter of it will be stepped."""
        if self.semantics is Method.NONE:
            seen = set(_EVERY)
        else:
            seen = self._seen
            if self.data_parallel:  # every rank decides from the global step's labels
                seen = global_route_labels(seen, self.process_group)
            if not self._seen:
                raise RuntimeError(
                    "StepLedger.release_idle(): no route labels were recorded for this step; "
                    "call ledger.record(route) after each micro-batch's backward"
                )
        idle = {}
        shared_rule, quarantine_rule = _RULES[self.semantics]
        for name, params, rule in (
            ("shared", self.groups.routed_shared, shared_rule),
            ("quarantine", self.groups.routed_quarantine, quarantine_rule),
        ):
            if seen & rule.every:
                pass  # every parameter may be trained: step them all
            elif seen & rule.some:
                for p in params:
                    if p.grad is not None and not bool(p.grad.any()):
                        p.grad = None
            else:
                for p in params:
                    p.grad = None
            idle[name] = bool(params) and all(p.grad is None for p in params)
        self.reset()
        return idle

    def before_step(self, max_norm: float | None = None) -> StepReport:
        """Everything a routed step does before ``optimizer.step()``: release idle
        gradients, then clip each group to ``max_norm`` (``None`` or ``<= 0``: no clip)."""
        idle = self.release_idle()
        norms = clip_grad_norm_by_group(self.groups, max_norm) if max_norm and max_norm > 0 else {}
        return StepReport(idle, norms)


def routed_step(
    optimizer: torch.optim.Optimizer,
    ledger: StepLedger,
    max_norm: float | None = None,
    zero_grad: bool = True,
) -> StepReport:
    """One routed optimizer step: release idle gradients (from the labels the ledger
    recorded), clip shared and quarantine gradients separately to ``max_norm``, step, and
    (``zero_grad``) set every gradient to ``None``."""
    report = ledger.before_step(max_norm)
    optimizer.step()
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    return report


def clip_grad_norm_by_group(groups: ParameterGroups, max_norm: float) -> dict[str, float]:
    """Clip shared and quarantine gradients separately; returns each group's norm."""
    norms = {}
    for name, params in (("shared", groups.shared), ("quarantine", groups.quarantine)):
        with_grad = [p for p in params if p.grad is not None]
        if with_grad:
            norms[name] = float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm))
        else:
            norms[name] = 0.0
    return norms

"""Keeping the optimizer from moving parameters on behalf of tokens that may not train them.

Masking gradients is not enough with stateful optimizers. The SGTM reference trainer
zeroes retain-parameter gradients on forget steps and then calls ``AdamW.step()``, which
still moves those parameters through momentum and weight decay. Two rules close the leak:

1. **Idle groups are skipped, not zeroed.** If no token of an optimizer step (all
   micro-batches of a gradient-accumulation step together) may write into a parameter
   group, the group's gradients are set to ``None`` before ``step()``. PyTorch optimizers
   skip parameters whose gradient is ``None`` entirely: no momentum update, no weight
   decay, no step count. :class:`StepLedger` tracks this across micro-batches.
2. **Clipping is per group.** A global gradient-norm clip would scale the shared update
   by a factor that depends on the forget tokens' quarantine gradients. We clip shared
   and quarantine parameters separately (:func:`clip_grad_norm_by_group`).

Per-token masking inside a step (``routing.functional``) guarantees that the gradient of
a shared parameter holds no contribution of forget tokens, so momentum built from it
carries none either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from evil_moe.modules.ablation import quarantine_parameters
from evil_moe.routing.labels import RouteLabel


@dataclass
class ParameterGroups:
    """A model's parameters split by who may train them."""

    #: shared parameters masked for forget tokens (kept at deployment)
    routed_shared: list[nn.Parameter] = field(default_factory=list)
    #: shared parameters every token trains (e.g. embeddings when they are not routed)
    open_shared: list[nn.Parameter] = field(default_factory=list)
    #: quarantine parameters (ablated at deployment)
    quarantine: list[nn.Parameter] = field(default_factory=list)

    @property
    def shared(self) -> list[nn.Parameter]:
        return self.routed_shared + self.open_shared


def parameter_groups(model: nn.Module, unrouted: set[str] | None = None) -> ParameterGroups:
    """Split ``model``'s parameters; ``unrouted`` names shared parameters open to all tokens."""
    unrouted = unrouted or set()
    quarantine = {id(p) for p in quarantine_parameters(model).values()}
    groups = ParameterGroups()
    for name, p in model.named_parameters():
        if id(p) in quarantine:
            groups.quarantine.append(p)
        elif name in unrouted:
            groups.open_shared.append(p)
        else:
            groups.routed_shared.append(p)
    return groups


class StepLedger:
    """Records, over the micro-batches of one optimizer step, which groups were trained.

    Call :meth:`record` with each micro-batch's route labels (``None`` for an unrouted
    batch) and :meth:`release_idle` right before ``optimizer.step()``.
    """

    def __init__(self, groups: ParameterGroups, semantics: str = "sgtm"):
        self.groups = groups
        self.semantics = semantics
        self.reset()

    def reset(self) -> None:
        self.shared_trained = False
        self.quarantine_trained = False

    def record(self, route: Tensor | None) -> None:
        if route is None or self.semantics == "none":
            self.shared_trained = self.quarantine_trained = True
            return
        forget = route == RouteLabel.FORGET
        retain = route == RouteLabel.RETAIN
        if self.semantics == "demix":
            self.shared_trained |= bool((~forget).any())
            self.quarantine_trained |= bool(forget.any())
        else:
            # gradient_routing also leaves shared weights without forget gradient where
            # they only feed forget tokens; treating it like SGTM here is the safe side.
            self.shared_trained |= bool((~forget).any())
            self.quarantine_trained |= bool((~retain).any())

    def release_idle(self) -> dict[str, bool]:
        """Drop the gradients of groups no token of this step could train; then reset."""
        skipped = {"shared": not self.shared_trained, "quarantine": not self.quarantine_trained}
        if skipped["shared"]:
            for p in self.groups.routed_shared:
                p.grad = None
        if skipped["quarantine"]:
            for p in self.groups.quarantine:
                p.grad = None
        self.reset()
        return skipped


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

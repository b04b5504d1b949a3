"""Keeping the optimizer from moving parameters on behalf of tokens that may not train them.

Masking gradients is not enough with stateful optimizers. The SGTM reference trainer
zeroes retain-parameter gradients on forget steps and then calls ``AdamW.step()``, which
still moves those parameters through momentum and weight decay. Two rules close the leak:

1. **Idle parameters are skipped, not zeroed.** If no token of an optimizer step (all
   micro-batches of a gradient-accumulation step together) wrote into a parameter, its
   gradient is set to ``None`` before ``step()``. PyTorch optimizers skip parameters
   whose gradient is ``None`` entirely: no momentum update, no weight decay, no step
   count. :class:`StepLedger` does this.
2. **Clipping is per group.** A global gradient-norm clip would scale the shared update
   by a factor that depends on the forget tokens' quarantine gradients. We clip shared
   and quarantine parameters separately (:func:`clip_grad_norm_by_group`).

Per-token masking inside a step (``routing.functional``) guarantees that the gradient of
a shared parameter holds no contribution of forget tokens, so momentum built from it
carries none either.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

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

    @classmethod
    def split(
        cls,
        model: nn.Module,
        quarantine: Iterable[nn.Parameter],
        unrouted: Collection[str] = (),
    ) -> ParameterGroups:
        """Split ``model``'s parameters: ``quarantine`` are the ablated ones, ``unrouted``
        names shared parameters open to all tokens, every other one is routed shared.

        :func:`evil_moe.modules.ablation.parameter_groups` finds the quarantine itself.
        """
        ids = {id(p) for p in quarantine}
        groups = cls()
        for name, p in model.named_parameters():
            if id(p) in ids:
                groups.quarantine.append(p)
            elif name in unrouted:
                groups.open_shared.append(p)
            else:
                groups.routed_shared.append(p)
        return groups


class StepLedger:
    """Skips, at each optimizer step, every parameter that no token of the step trained.

    Masked tokens contribute exact zeros, so a parameter whose gradient, accumulated over
    all micro-batches of the step, is exactly zero everywhere received no contribution
    from any token: its gradient is set to ``None`` and the optimizer leaves it, and its
    state, untouched. This is exact per parameter under every semantics: under SGTM a
    forget-only step skips every routed shared parameter and a retain-only step the
    quarantine experts; under DEMix attention still trains on forget tokens; under
    gradient routing embeddings still do. :meth:`record` keeps a per-step summary of
    the route labels seen (for logs); call :meth:`release_idle` right before
    ``optimizer.step()``.
    """

    def __init__(self, groups: ParameterGroups, semantics: str = "sgtm"):
        self.groups = groups
        self.semantics = semantics
        self.reset()

    def reset(self) -> None:
        self.labels_seen: set[int] = set()

    def record(self, route: Tensor | None) -> None:
        if route is None:
            self.labels_seen.add(int(RouteLabel.UNLABELED))
        else:
            self.labels_seen.update(int(v) for v in torch.unique(route))

    def release_idle(self) -> dict[str, bool]:
        """Drop exactly-zero gradients of routed parameters; returns which groups were idle."""
        skipped = {}
        for name, params in (
            ("shared", self.groups.routed_shared),
            ("quarantine", self.groups.quarantine),
        ):
            idle = True
            for p in params:
                if p.grad is not None and not bool(p.grad.any()):
                    p.grad = None
                idle &= p.grad is None
            skipped[name] = idle and bool(params)
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

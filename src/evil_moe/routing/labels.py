"""Route labels and the per-forward routing plan.

A *route label* says how one token position may train the model (MISSION.md):

* ``retain``: known clean. The quarantine is zeroed in its forward pass, so retain data
  can never come to rely on it.
* ``forget``: labelled bad by the monitor. Under SGTM it contributes exactly zero gradient
  to every routed shared parameter; the forward pass is unchanged.
* ``unlabeled``: everything else. Trains everything.

Labels are per input position. With sequence-level labels (every position of a sequence
has the same label, the usual case) the per-position rule equals the per-example rule of
the SGTM paper, which is what the slow reference in the tests checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor


class RouteLabel(IntEnum):
    """Integer codes of route labels, as stored in ``route`` tensors."""

    RETAIN = 0
    FORGET = 1
    UNLABELED = 2


ROUTE_NAMES = {label.name.lower(): int(label) for label in RouteLabel}

#: How routing acts. ``none``: standard training (labels ignored); ``sgtm``: selective
#: gradient masking of parameters; ``gradient_routing``: detach the shared activations of
#: forget tokens (Cloud et al.); ``demix``: hard forward dispatch (negative control);
#: ``demix_masked``: hard dispatch plus SGTM's masking of every routed shared parameter, so
#: that it differs from ``sgtm`` in the dispatch alone.
SEMANTICS = ("none", "sgtm", "gradient_routing", "demix", "demix_masked")


@dataclass
class RoutingPlan:
    """Masks derived once per forward pass from the route labels, flattened to N tokens.

    Every mask is a float tensor of shape ``[N, 1]`` (broadcast over features) or ``None``
    when it would be all ones, so unrouted batches cost nothing.
    """

    semantics: str
    #: 1 where the token may write gradient into routed shared parameters (0 = forget).
    shared_grad: Tensor | None = None
    #: 1 where the quarantine is present in the forward pass (0 = retain under SGTM).
    quarantine_on: Tensor | None = None
    #: 1 where the shared path is present in the forward pass (0 = forget under DEMix).
    shared_on: Tensor | None = None
    #: 1 where cotangent flows into shared block outputs (0 = forget, gradient routing).
    shared_cotangent: Tensor | None = None
    #: bool [N]: tokens whose quarantine gradient the backward router assigns to experts.
    routed: Tensor | None = None
    #: long [N]: forget mode per token (-1 none), for specialisation statistics.
    mode: Tensor | None = None
    #: long [N]: the route labels themselves (for losses such as a gate's pin loss).
    route: Tensor | None = None

    @property
    def n_tokens(self) -> int | None:
        for mask in (self.shared_grad, self.quarantine_on, self.shared_on, self.routed):
            if mask is not None:
                return mask.shape[0]
        return None


def make_plan(
    route: Tensor | None,
    semantics: str = "sgtm",
    mode: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> RoutingPlan:
    """Build the routing plan for one forward pass from per-position route labels.

    ``route`` holds :class:`RouteLabel` codes of any shape; it is flattened in row-major
    order, the same order in which the model flattens its activations.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown routing semantics {semantics!r}; choose from {SEMANTICS}")
    if route is None or semantics == "none":
        return RoutingPlan(semantics="none")
    flat = route.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 2):
        raise ValueError("route labels must be 0 (retain), 1 (forget) or 2 (unlabeled)")
    forget = flat == RouteLabel.FORGET
    retain = flat == RouteLabel.RETAIN
    any_forget = bool(forget.any())
    any_retain = bool(retain.any())

    def keep(mask: Tensor, present: bool) -> Tensor | None:
        return (~mask).to(dtype).unsqueeze(1) if present else None

    plan = RoutingPlan(semantics=semantics, routed=forget if any_forget else None, route=flat)
    if mode is not None:
        plan.mode = mode.reshape(-1)
    if semantics == "sgtm":
        plan.shared_grad = keep(forget, any_forget)
        plan.quarantine_on = keep(retain, any_retain)
    elif semantics == "gradient_routing":
        plan.shared_cotangent = keep(forget, any_forget)
        plan.quarantine_on = keep(retain, any_retain)
    elif semantics in ("demix", "demix_masked"):
        # Forget tokens see only the quarantine, everything else only the shared path.
        plan.shared_on = keep(forget, any_forget)
        plan.quarantine_on = (forget.to(dtype)).unsqueeze(1)
        if semantics == "demix_masked":
            plan.shared_grad = keep(forget, any_forget)
    return plan

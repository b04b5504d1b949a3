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

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

import numpy as np
import torch
from torch import Tensor


class RouteLabel(IntEnum):
    """Route labels and their integer codes in ``route`` tensors. The one definition of
    the route label names: ``RouteLabel.FORGET.label == "forget"``."""

    RETAIN = 0
    FORGET = 1
    UNLABELED = 2

    @property
    def label(self) -> str:
        """The route label's name: ``"retain"``, ``"forget"`` or ``"unlabeled"``."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: RouteLabel | int | str) -> RouteLabel:
        """One route label from its code or its name; ``ValueError`` otherwise."""
        if isinstance(value, str):
            code = ROUTE_NAMES.get(value)
            if code is None:
                raise ValueError(f"unknown route label {value!r}; choose from {list(ROUTE_NAMES)}")
            return cls(code)
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"a route label is a code or a name, got {value!r}")
        if not 0 <= int(value) <= 2:
            raise ValueError(_RANGE_ERROR.format(bad=int(value)))
        return cls(int(value))


#: route label name -> code
ROUTE_NAMES: dict[str, int] = {label.label: int(label) for label in RouteLabel}
_RANGE_ERROR = "route labels must be 0 (retain), 1 (forget) or 2 (unlabeled), got {bad}"


class Method(StrEnum):
    """A training method, and the routing semantics it trains with.

    ``none``: standard training (labels ignored); ``filter``: labelled forget data is
    dropped, the rest trains normally; ``sgtm``: selective gradient masking of parameters;
    ``gradient_routing``: detach the shared activations of forget tokens (Cloud et al.);
    ``demix``: hard forward dispatch (the negative control); ``demix_masked``: hard
    dispatch plus SGTM's masking of every routed shared parameter, so that it differs from
    ``sgtm`` in the dispatch alone. Config strings are the values (``train.method=sgtm``);
    a ``Method`` compares equal to its string.
    """

    NONE = "none"
    FILTER = "filter"
    SGTM = "sgtm"
    GRADIENT_ROUTING = "gradient_routing"
    DEMIX = "demix"
    DEMIX_MASKED = "demix_masked"

    @classmethod
    def parse(
        cls, value: Method | str, choices: Sequence[Method] | None = None, what: str = "method"
    ) -> Method:
        """``value`` as a ``Method`` among ``choices`` (default all); ``ValueError`` otherwise."""
        allowed = tuple(cls) if choices is None else tuple(choices)
        if value not in allowed:
            names = [m.value for m in allowed]
            raise ValueError(f"unknown {what} {value!r}; choose from {names}")
        return cls(value)

    @property
    def semantics(self) -> Method:
        """How routing acts in the forward and backward pass (``filter`` trains unrouted)."""
        return Method.NONE if self is Method.FILTER else self

    @property
    def routed(self) -> bool:
        """Whether route labels change the gradients (a quarantine is trained and ablated)."""
        return self.semantics is not Method.NONE


#: the routing semantics: the methods that describe how a forward/backward pass is routed
SEMANTICS: tuple[Method, ...] = tuple(m for m in Method if m.semantics is m)


def parse_route_labels(
    labels: Any,
    shape: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    what: str = "route labels",
) -> Tensor:
    """Route labels as a long tensor of :class:`RouteLabel` codes.

    ``labels``: codes or names (``"retain"``, ``"forget"``, ``"unlabeled"``), as one value, a
    (nested) list or tuple, a numpy array or a tensor. With ``shape=(B, T)`` the result is
    ``[B, T]``: one label, or per-sequence labels ``[B]``, are broadcast over the sequence;
    per-token labels must be ``[B, T]``. Without ``shape`` the labels keep their own shape.
    Raises ``ValueError`` for unknown names, codes other than 0, 1, 2, non-integer values
    and shapes that are neither ``[B]`` nor ``[B, T]``.
    """
    route = _as_code_tensor(labels, what)
    if route.numel():
        bad = (route < 0) | (route > 2)
        if bool(bad.any()):
            raise ValueError(_RANGE_ERROR.format(bad=int(route[bad][0])))
    if device is not None:
        route = route.to(device)
    return route if shape is None else broadcast_per_token(route, shape, what)


def broadcast_per_token(values: Tensor, shape: Sequence[int], what: str = "labels") -> Tensor:
    """Per-sequence ``[B]`` (or one) value(s) broadcast to ``shape = (B, T)``; ``[B, T]`` as is."""
    if len(shape) != 2:
        raise ValueError(f"{what}: the input shape must be [B, T], got {tuple(shape)}")
    b, t = int(shape[0]), int(shape[1])
    if values.dim() == 0:
        return values.expand(b, t)
    if values.dim() == 1 and values.shape[0] == b:
        return values[:, None].expand(b, t)
    if tuple(values.shape) == (b, t):
        return values
    raise ValueError(
        f"{what} of shape {tuple(values.shape)} match neither per-sequence [B]={b} nor "
        f"per-token [B, T]=({b}, {t})"
    )


def _as_code_tensor(labels: Any, what: str) -> Tensor:
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu":
        labels = torch.from_numpy(labels)
    if isinstance(labels, Tensor):
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"{what} must be integer codes or names, got a {labels.dtype} tensor")
        return labels.long()
    try:
        return torch.tensor(_codes(labels), dtype=torch.long)
    except (TypeError, ValueError) as err:  # ragged lists, unknown names, floats
        raise ValueError(f"{what}: {err}") from None


def _codes(value: Any) -> Any:
    """Nested Python / numpy / tensor values with names replaced by codes."""
    if isinstance(value, Tensor | np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_codes(v) for v in value]
    if isinstance(value, str | int | np.integer) and not isinstance(value, bool):
        return int(RouteLabel.parse(value)) if isinstance(value, str) else int(value)
    raise ValueError(f"a route label is a code or a name, got {value!r}")


@dataclass
class RoutingPlan:
    """Masks derived once per forward pass from the route labels, flattened to N tokens.

    Every mask is a float tensor of shape ``[N, 1]`` (broadcast over features) or ``None``
    when it would be all ones, so unrouted batches cost nothing.
    """

    semantics: Method
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
    route: Any,
    semantics: Method | str = Method.SGTM,
    mode: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> RoutingPlan:
    """Build the routing plan for one forward pass from per-position route labels.

    ``route`` holds route labels of any shape (anything :func:`parse_route_labels` reads);
    it is flattened in row-major order, the order in which a model flattens its activations.
    """
    semantics = Method.parse(semantics, SEMANTICS, "routing semantics")
    if route is None or semantics is Method.NONE:
        return RoutingPlan(semantics=Method.NONE)
    flat = parse_route_labels(route).reshape(-1)
    forget = flat == RouteLabel.FORGET
    retain = flat == RouteLabel.RETAIN
    any_forget = bool(forget.any())
    any_retain = bool(retain.any())

    def keep(mask: Tensor, present: bool) -> Tensor | None:
        return (~mask).to(dtype).unsqueeze(1) if present else None

    plan = RoutingPlan(semantics=semantics, routed=forget if any_forget else None, route=flat)
    if mode is not None:
        plan.mode = mode.reshape(-1)
    if semantics is Method.SGTM:
        plan.shared_grad = keep(forget, any_forget)
        plan.quarantine_on = keep(retain, any_retain)
    elif semantics is Method.GRADIENT_ROUTING:
        plan.shared_cotangent = keep(forget, any_forget)
        plan.quarantine_on = keep(retain, any_retain)
    elif semantics in (Method.DEMIX, Method.DEMIX_MASKED):
        # Forget tokens see only the quarantine, everything else only the shared path.
        plan.shared_on = keep(forget, any_forget)
        plan.quarantine_on = (forget.to(dtype)).unsqueeze(1)
        if semantics is Method.DEMIX_MASKED:
            plan.shared_grad = keep(forget, any_forget)
    return plan

"""The hooks :func:`~evil_moe.models.inject.inject` registers, and the routing state
they read.

* :class:`RoutePreHook` (on the model): consumes ``route_labels=`` / ``route_modes=``
  keyword arguments and sets the plan of the forward pass.
* :class:`EmbeddingHook` (on embeddings): masks the cotangent of the lookup, so that the
  embedding's gradient skips forget tokens.

Each hook reads the state attached to its module (:func:`attach_state`), never a
captured one, so a deep copy of the model routes by its own state.
"""

from __future__ import annotations

from torch import Tensor, nn

from evil_moe.models.adapters import RoutingState, n_tokens
from evil_moe.routing.functional import mask_cotangent

__all__ = [
    "EmbeddingHook",
    "RouteHook",
    "RoutePreHook",
    "attach_state",
    "detach_state",
    "state_of",
]

STATE_ATTR = "_evil_moe_state"


def attach_state(module: nn.Module, state: RoutingState) -> None:
    """Give a hooked module the routing state its hooks read."""
    module.__dict__[STATE_ATTR] = state


def detach_state(module: nn.Module) -> None:
    """Remove the routing state :func:`attach_state` gave ``module`` (if any)."""
    module.__dict__.pop(STATE_ATTR, None)


def state_of(module: nn.Module) -> RoutingState:
    """The routing state attached to a hooked module (survives ``deepcopy`` and pickling)."""
    return module.__dict__[STATE_ATTR]


class RouteHook:
    """Base of the hooks :func:`~evil_moe.models.inject.inject` registers (the handle
    keeps the handles that registration returns, and removes them at unload). Each reads
    the state attached to its module, never a captured one, so a deep copy of the model
    routes by its own state."""

    def __init__(self, name: str = ""):
        self.name = name


class RoutePreHook(RouteHook):
    """Forward pre-hook of the injected model: consumes ``route_labels`` / ``route_modes``
    keyword arguments and sets the plan of this forward pass (the HF forward never sees them).
    """

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        labels = kwargs.pop("route_labels", None)
        modes = kwargs.pop("route_modes", None)
        ref = kwargs.get("input_ids")
        if ref is None and args and isinstance(args[0], Tensor):
            ref = args[0]
        if ref is None and isinstance(kwargs.get("inputs_embeds"), Tensor):
            ref = kwargs["inputs_embeds"][..., 0]
        shape = tuple(ref.shape) if ref is not None else None
        device = ref.device if ref is not None else None
        state_of(module).begin_forward(labels, modes, shape, device)
        return args, kwargs


class EmbeddingHook(RouteHook):
    """Forward hook making an embedding's weight gradient skip forget tokens.

    Nothing is upstream of a lookup, so masking the cotangent of its output masks its
    parameter gradient exactly. Outputs that broadcast over the batch (position
    embeddings of shape ``[1, T, d]``) are expanded to ``[B, T, d]`` first.
    """

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        state = state_of(module)
        keep = state.plan.shared_grad
        if keep is None or not state.enabled or not isinstance(out, Tensor):
            return None
        if n_tokens(out) != keep.shape[0]:
            shape = state.shape
            if shape is None or out.dim() != len(shape) + 1:
                raise ValueError(
                    f"{self.name}: embedding output {tuple(out.shape)} vs labels {shape}"
                )
            out = out.expand(*shape, out.shape[-1])
        return mask_cotangent(out, keep)

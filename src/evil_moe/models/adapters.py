"""Layers that add a quarantine bank to an existing model (used by :mod:`evil_moe.models.inject`).

Every wrapper keeps the layer it replaces as ``base_layer`` (PEFT style) and reads the
per-forward :class:`~evil_moe.routing.labels.RoutingPlan` from a :class:`RoutingState`
shared by all wrappers of one model. The routing math is the shared code of the testbed:
:class:`~evil_moe.modules.experts.FusedExperts` for the K quarantine experts,
:func:`~evil_moe.routing.functional.routed_linear` for trained base weights and the shared
expert, :func:`~evil_moe.routing.functional.mask_cotangent` for gradient-routing semantics.

* :class:`QuarantineLinear` (``kind="lora"``): ``base(x) + shared_lora(x) + sum_k B_k A_k x``.
* :class:`QuarantineMLP` (``kind="mlp"``): ``mlp(x) + shared_mlp(x) + sum_k expert_k(x)``.
* :class:`RoutedBaseLinear`: a trained base linear layer that is not a target; its weight
  gradient only sums the tokens that may train shared parameters.

Quarantine ``down`` matrices (LoRA ``B``) and the shared expert's ``down`` start at zero,
so the wrapped model computes exactly what the original model did.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor, nn
from torch.func import functional_call

from evil_moe.modules.experts import MLP, FusedExperts, shared_grad_keep
from evil_moe.routing.functional import DeferredKeep, mask_cotangent, routed_linear
from evil_moe.routing.labels import (
    Method,
    RoutingPlan,
    broadcast_per_token,
    make_plan,
    parse_route_labels,
)
from evil_moe.routing.routers import RouterConfig

NO_PLAN = RoutingPlan(semantics=Method.NONE)
#: Semantics a wrapped Hugging Face model supports (DEMix would replace whole base layers).
HF_SEMANTICS = (Method.NONE, Method.SGTM, Method.GRADIENT_ROUTING)


@functools.cache
def conv1d_class() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layer), if transformers is here."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is an optional dependency
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    conv = conv1d_class()
    return isinstance(module, nn.Linear) or (conv is not None and isinstance(module, conv))


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like layer."""
    conv = conv1d_class()
    if conv is not None and isinstance(module, conv):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    raise ValueError(f"{type(module).__name__} is not a linear layer (no in/out features)")


def linear_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """Weight as ``[out, in]`` (``F.linear`` layout; a view for Conv1D) and bias."""
    conv = conv1d_class()
    if conv is not None and isinstance(module, conv):
        return module.weight.t(), module.bias
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    raise ValueError(f"cannot route the weight of {type(module).__name__}: not nn.Linear/Conv1D")


def _adapter_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype for new adapter parameters: half-precision bases get float32."""
    p = next(module.parameters(), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
    if not dtype.is_floating_point:  # quantized bases
        dtype = torch.float32
    return p.device, dtype


def _tokens(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


class RoutingState:
    """The routing plan of the current forward pass, shared by all wrappers of a model.

    A plan is set at the start of every forward pass of the model (from a
    ``route_labels=`` batch key or the innermost active :func:`route_labels` context;
    neither clears it) and **stays set until the next forward pass**, so the
    recomputation of activation checkpointing inside ``backward()`` sees the same plan.
    """

    def __init__(self, semantics: Method | str = Method.SGTM):
        self.semantics = Method.parse(semantics, HF_SEMANTICS, "routing semantics")
        self.plan: RoutingPlan = NO_PLAN
        #: ``(B, T)`` of the current route labels, or ``None``
        self.shape: tuple[int, ...] | None = None
        self.pending: list[tuple[Tensor, Tensor | None]] = []
        self.enabled = True
        self.scale = 1.0
        self.guard = False

    def begin_forward(
        self,
        labels: Tensor | None,
        modes: Tensor | None = None,
        ref_shape: tuple[int, ...] | None = None,
        device: torch.device | None = None,
    ) -> None:
        """Build the plan for one forward pass (``labels=None``: the active context's)."""
        if labels is None and self.pending:
            labels, modes = self.pending[-1]
        if labels is None:
            self.plan, self.shape = NO_PLAN, None
            return
        route = _route_tensor(labels, ref_shape, device)
        mode = None
        if modes is not None:
            modes = torch.as_tensor(modes, device=route.device).long()
            mode = broadcast_per_token(modes, tuple(route.shape), "route_modes")
        self.plan = make_plan(route, self.semantics, mode)
        self.shape = tuple(route.shape)

    def plan_for(self, x: Tensor, where: str) -> RoutingPlan:
        """The current plan, checked against the ``N`` token rows of ``x``."""
        plan = self.plan
        n = plan.n_tokens
        if n is not None and _tokens(x) != n:
            raise ValueError(
                f"{where}: the route labels cover {n} tokens (shape {self.shape}) but this layer "
                f"got {_tokens(x)} (input shape {tuple(x.shape)}); route labels must match the "
                "batch of the forward pass they are given to"
            )
        return plan

    def quarantine_on(self, plan: RoutingPlan, x: Tensor) -> Tensor | None:
        """Per-token quarantine factor: the plan's mask times the forget scale."""
        on = plan.quarantine_on
        if self.scale != 1.0:
            base = on if on is not None else x.new_ones(_tokens(x), 1, dtype=torch.float32)
            on = base * self.scale
        return on


def _route_tensor(
    labels: object, ref_shape: tuple[int, ...] | None, device: torch.device | None
) -> Tensor:
    """Route labels as ``[B, T]`` codes for an input of shape ``ref_shape`` (``[B, T]``)."""
    if ref_shape is not None and len(ref_shape) >= 2:
        return parse_route_labels(labels, ref_shape[:2], device, "route_labels")
    route = parse_route_labels(labels, None, device, "route_labels")
    if route.dim() != 2:
        raise ValueError("route_labels must be [B, T] when the input shape is unknown")
    return route


class SharedLoRA(nn.Module):
    """Always-on shared LoRA ``B A`` (deployed); its gradients obey the shared mask."""

    def __init__(self, d_in: int, d_out: int, rank: int, init_std: float):
        super().__init__()
        self.up = nn.Parameter(torch.randn(rank, d_in) * init_std)
        self.down = nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x: Tensor, keep: Tensor | DeferredKeep | None = None) -> Tensor:
        return routed_linear(routed_linear(x, self.up, None, keep), self.down, None, keep)

    def delta_weight(self) -> Tensor:
        """``B A`` as an ``[out, in]`` matrix."""
        return self.down @ self.up


class Wrapper(nn.Module):
    """Common part of all wrappers: the wrapped ``base_layer`` and the shared state."""

    def __init__(self, base_layer: nn.Module, state: RoutingState, name: str):
        super().__init__()
        self.base_layer = base_layer
        self.state = state
        self.layer_name = name

    def __getattr__(self, name: str):  # PEFT-like: expose the base layer's attributes
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


class RoutedBaseLinear(Wrapper):
    """A trained base linear layer whose weight gradient skips forget tokens (SGTM)."""

    def forward(self, x: Tensor) -> Tensor:
        state = self.state
        if not state.enabled or state.plan.shared_grad is None:
            return self.base_layer(x)
        plan = state.plan_for(x, self.layer_name)
        weight, bias = linear_weight(self.base_layer)
        return routed_linear(x, weight, bias, plan.shared_grad)


class QuarantineLayer(Wrapper):
    """A base layer plus an optional shared expert and K quarantine experts."""

    experts: FusedExperts
    shared: nn.Module | None
    router: nn.Module | None

    def __init__(
        self,
        base_layer: nn.Module,
        state: RoutingState,
        name: str,
        router: RouterConfig | None,
        d_out: int,
        n_experts: int,
        seed: int,
    ):
        super().__init__(base_layer, state, name)
        self.router = router.build(n_experts, d_out, seed=seed) if router is not None else None

    @property
    def n_experts(self) -> int:
        return self.experts.n_experts

    def base_forward(
        self, x: Tensor, keep: Tensor | DeferredKeep | None, *args, **kwargs
    ) -> Tensor:
        raise NotImplementedError

    def combine(self, x: Tensor, *args, **kwargs) -> Tensor:
        """``base + shared + quarantine_on * sum_k expert_k``, routed by the current plan."""
        state = self.state
        if not state.enabled:
            return self.base_layer(x, *args, **kwargs)
        plan = state.plan_for(x, self.layer_name)
        router = self.router if torch.is_grad_enabled() else None
        keep = shared_grad_keep(plan, router, x)
        out = self.base_forward(x, keep, *args, **kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{self.layer_name}: base layer returned {type(out).__name__}, not a tensor"
            )
        dtype = self.experts.up.dtype  # the shared expert has the same dtype
        xq = x.to(dtype) if _needs_cast(x, self.experts.up) else x
        if self.shared is not None:
            out = out + self.shared(xq, keep).to(out.dtype)
        out = mask_cotangent(out, plan.shared_cotangent)
        if state.scale == 0.0:
            return out
        # The per-token quarantine factor goes in as the experts' gate: it then scales the
        # narrow hidden units instead of the wide output (same values, much less traffic).
        on = state.quarantine_on(plan, x)
        gate = None
        if on is not None:
            k = self.experts.n_experts
            gate = on.to(xq.dtype).reshape(*x.shape[:-1], 1).expand(*x.shape[:-1], k)
            plan = dataclasses.replace(plan, quarantine_on=None)
        residual = out.to(dtype) if _needs_cast(out, self.experts.up) else out
        shared_keep = keep if isinstance(keep, DeferredKeep) else None
        y = self.experts(xq, plan, router, residual=residual, shared_keep=shared_keep, gate=gate)
        return y.to(out.dtype)


def _needs_cast(x: Tensor, param: Tensor) -> bool:
    """Cast activations to the adapter dtype, except under autocast (which casts itself)."""
    return x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type)


class QuarantineLinear(QuarantineLayer):
    """``kind="lora"``: a linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) with K LoRA
    quarantine experts of rank ``rank`` each and an optional shared LoRA."""

    def __init__(
        self,
        base_layer: nn.Module,
        state: RoutingState,
        name: str,
        n_experts: int,
        rank: int,
        shared_rank: int = 0,
        router: RouterConfig | None = None,
        route_base: bool = False,
        init_std: float | None = None,
        seed: int = 0,
    ):
        d_in, d_out = linear_dims(base_layer)
        super().__init__(base_layer, state, name, router, d_out, n_experts, seed)
        if route_base:
            linear_weight(base_layer)  # raises for layer types that cannot be routed
        self.route_base = route_base
        std = init_std if init_std is not None else (3 * d_in) ** -0.5
        device, dtype = _adapter_dtype(base_layer)
        self.experts = FusedExperts(
            d_in, d_out, n_experts * rank, n_experts, "identity", bias=False, init_std=std
        )
        with torch.no_grad():
            self.experts.down.zero_()
        self.shared = SharedLoRA(d_in, d_out, shared_rank, std) if shared_rank > 0 else None
        self.experts.to(device=device, dtype=dtype)
        if self.shared is not None:
            self.shared.to(device=device, dtype=dtype)
        self.d_in, self.d_out = d_in, d_out

    def base_forward(
        self, x: Tensor, keep: Tensor | DeferredKeep | None, *args, **kwargs
    ) -> Tensor:
        if not self.route_base or keep is None:
            return self.base_layer(x)
        weight, bias = linear_weight(self.base_layer)
        return routed_linear(x, weight, bias, keep)

    def forward(self, x: Tensor) -> Tensor:
        return self.combine(x)

    @torch.no_grad()
    def merge_shared(self) -> None:
        """Add the shared LoRA into the base weight and drop it (outputs unchanged)."""
        if self.shared is None:
            return
        delta = self.shared.delta_weight()
        weight, _ = linear_weight(self.base_layer)  # [out, in] (a view for Conv1D)
        weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
        self.shared = None


class QuarantineMLP(QuarantineLayer):
    """``kind="mlp"``: the model's MLP block plus K parallel quarantine MLP experts (hidden
    width ``width`` each) and an optional shared MLP expert, all reading the MLP's input."""

    def __init__(
        self,
        base_layer: nn.Module,
        state: RoutingState,
        name: str,
        d_model: int,
        n_experts: int,
        width: int,
        shared_width: int = 0,
        activation: str = "gelu",
        router: RouterConfig | None = None,
        init_std: float | None = None,
        seed: int = 0,
    ):
        super().__init__(base_layer, state, name, router, d_model, n_experts, seed)
        std = init_std if init_std is not None else 0.02
        device, dtype = _adapter_dtype(base_layer)
        self.experts = FusedExperts(
            d_model, d_model, n_experts * width, n_experts, activation, bias=True, init_std=std
        )
        with torch.no_grad():
            self.experts.down.zero_()
        self.shared = None
        if shared_width > 0:
            shared = MLP(d_model, shared_width, activation)
            with torch.no_grad():
                nn.init.normal_(shared.up.weight, std=std)
                shared.up.bias.zero_()
                shared.down.weight.zero_()
                shared.down.bias.zero_()
            self.shared = shared.to(device=device, dtype=dtype)
        self.experts.to(device=device, dtype=dtype)
        self.d_in = self.d_out = d_model

    def base_forward(
        self, x: Tensor, keep: Tensor | DeferredKeep | None, *args, **kwargs
    ) -> Tensor:
        # Trained base weights inside the MLP are RoutedBaseLinear wrappers themselves.
        return self.base_layer(x, *args, **kwargs)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.combine(x, *args, **kwargs)


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
        if _tokens(out) != keep.shape[0]:
            shape = state.shape
            if shape is None or out.dim() != len(shape) + 1:
                raise ValueError(
                    f"{self.name}: embedding output {tuple(out.shape)} vs labels {shape}"
                )
            out = out.expand(*shape, out.shape[-1])
        return mask_cotangent(out, keep)


class PerTokenHook(RouteHook):
    """Forward hook giving a per-token module (a norm) exact per-token parameter masks.

    Recomputes the module with detached parameters and picks that output for tokens that
    may not train shared parameters (the rule of ``routed_module_call``).
    """

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor | None:
        state = state_of(module)
        keep = state.plan.shared_grad
        if keep is None or state.guard or not state.enabled or not isinstance(out, Tensor):
            return None
        if _tokens(out) != keep.shape[0]:
            raise ValueError(
                f"{self.name}: output {tuple(out.shape)} vs route labels {state.shape}"
            )
        params = {n: p.detach() for n, p in module.named_parameters()}
        state.guard = True
        try:
            frozen = functional_call(module, params, args, kwargs)
        finally:
            state.guard = False
        flags = keep.reshape(*out.shape[:-1], 1).bool()
        return torch.where(flags, out, frozen)

"""Layers that add a quarantine bank to an existing model (used by :mod:`evil_moe.models.inject`).

Every wrapper keeps the layer it replaces as ``base_layer`` (PEFT style) and reads the
per-forward :class:`~evil_moe.routing.labels.RoutingPlan` from a :class:`RoutingState`
shared by all wrappers of one model (the testbed's too: it is a plain GPT with these
wrappers injected). The routing math:
:class:`~evil_moe.modules.experts.FusedExperts` for the K quarantine experts,
:func:`~evil_moe.routing.functional.routed_linear` for trained base weights and the shared
expert, :func:`~evil_moe.routing.functional.mask_cotangent` for gradient-routing semantics.

* :class:`QuarantineLinear` (``kind="lora"``): ``base(x) + shared_lora(x) + sum_k B_k A_k x``.
* :class:`QuarantineMLP` (``kind="mlp"``): ``mlp(x) + shared_mlp(x) + sum_k expert_k(x)``.
* :class:`RoutedBaseLinear`: a trained base linear layer that is not a target; its weight
  gradient only sums the tokens that may train shared parameters.
* :class:`RoutedNorm`: a trained norm; its parameter gradients only sum those tokens.

Quarantine ``down`` matrices (LoRA ``B``) and the shared expert's ``down`` start at zero,
so the wrapped model computes exactly what the original model did.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch import Tensor, nn
from torch.func import functional_call

from evil_moe.modules.experts import MLP, FusedExperts, GateConfig, SoftGate, shared_grad_keep
from evil_moe.routing.functional import (
    DeferredKeep,
    mask_cotangent,
    per_token_parameter,
    routed_linear,
    select_kept,
)
from evil_moe.routing.labels import (
    SEMANTICS,
    Method,
    RoutingPlan,
    broadcast_per_token,
    make_plan,
    parse_route_labels,
)
from evil_moe.routing.routers import RouterConfig

NO_PLAN = RoutingPlan(semantics=Method.NONE)


def conv1d_class() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layer) if transformers has
    loaded it: a model that has such layers has imported it, and a model that has not
    never makes this import transformers."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


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


def n_tokens(x: Tensor) -> int:
    """Token rows of an activation ``[..., d]``."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


class RoutingState:
    """The routing plan of the current forward pass, shared by all wrappers of a model.

    A plan is set at the start of every forward pass of the model (from a
    ``route_labels=`` batch key or the innermost active :func:`route_labels` context;
    neither clears it) and **stays set until the next forward pass**, so the
    recomputation of activation checkpointing inside ``backward()`` sees the same plan.
    """

    def __init__(self, semantics: Method | str = Method.SGTM):
        self.semantics = Method.parse(semantics, SEMANTICS, "routing semantics")
        self.plan: RoutingPlan = NO_PLAN
        #: ``(B, T)`` of the current route labels, or ``None``
        self.shape: tuple[int, ...] | None = None
        self.pending: list[tuple[Tensor, Tensor | None]] = []
        self.enabled = True
        self.scale = 1.0
        #: the shared-gradient keep of the quarantine layer whose base is running (a
        #: ``DeferredKeep`` under the absorption amplifier): the routed base linears
        #: inside that layer use it instead of the plan's
        self.base_keep: Tensor | DeferredKeep | None = None

    def begin_forward(
        self,
        labels: Tensor | None,
        modes: Tensor | None = None,
        ref_shape: tuple[int, ...] | None = None,
        device: torch.device | None = None,
        semantics: Method | str | None = None,
        what: str = "route_labels",
    ) -> None:
        """Build the plan for one forward pass (``labels=None``: the active context's;
        ``semantics=None``: the state's; ``what`` names the labels in error messages)."""
        if labels is None and self.pending:
            labels, modes = self.pending[-1]
        if labels is None:
            self.plan, self.shape = NO_PLAN, None
            return
        route = _route_tensor(labels, ref_shape, device, what)
        mode = None
        if modes is not None:
            modes = torch.as_tensor(modes, device=route.device).long()
            mode = broadcast_per_token(modes, tuple(route.shape), "route_modes")
        self.plan = make_plan(route, self.semantics if semantics is None else semantics, mode)
        self.shape = tuple(route.shape)

    def plan_for(self, x: Tensor, where: str) -> RoutingPlan:
        """The current plan, checked against the ``N`` token rows of ``x``."""
        plan = self.plan
        n = plan.n_tokens
        if n is not None and n_tokens(x) != n:
            raise ValueError(
                f"{where}: the route labels cover {n} tokens (shape {self.shape}) but this layer "
                f"got {n_tokens(x)} (input shape {tuple(x.shape)}); route labels must match the "
                "batch of the forward pass they are given to"
            )
        return plan

    def quarantine_on(self, plan: RoutingPlan, x: Tensor) -> Tensor | None:
        """Per-token quarantine factor: the plan's mask times the forget scale."""
        on = plan.quarantine_on
        if self.scale != 1.0:
            base = on if on is not None else x.new_ones(n_tokens(x), 1, dtype=torch.float32)
            on = base * self.scale
        return on


def _route_tensor(
    labels: object, ref_shape: tuple[int, ...] | None, device: torch.device | None, what: str
) -> Tensor:
    """Route labels as ``[B, T]`` codes for an input of shape ``ref_shape`` (``[B, T]``)."""
    if ref_shape is not None and len(ref_shape) >= 2:
        return parse_route_labels(labels, ref_shape[:2], device, what)
    route = parse_route_labels(labels, None, device, what)
    if route.dim() != 2:
        raise ValueError(f"{what} must be [B, T] when the input shape is unknown")
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
        keep = state.base_keep if state.base_keep is not None else state.plan.shared_grad
        if not state.enabled or keep is None:
            return self.base_layer(x)
        state.plan_for(x, self.layer_name)
        weight, bias = linear_weight(self.base_layer)
        return routed_linear(x, weight, bias, keep)


class RoutedNorm(Wrapper):
    """A trained per-token module (a norm) whose parameter gradients skip forget tokens.

    It is called with its parameters expanded to one row per token
    (:func:`~evil_moe.routing.functional.per_token_parameter`): one forward, one backward.
    That is exact for modules that use their parameters in broadcasting elementwise ops
    (RMSNorm gains). When it is wrapped, the module is checked on a small random input
    against the generic rule (:func:`~evil_moe.routing.functional.select_kept`: run again
    with detached parameters, pick per token), values and parameter gradients; a module
    that cannot take expanded parameters (``nn.LayerNorm`` checks its weight's shape) or
    differs uses the generic rule. The check runs here, not in a forward pass, so that
    activation checkpointing recomputes exactly what it saved.
    """

    def __init__(self, base_layer: nn.Module, state: RoutingState, name: str):
        super().__init__(base_layer, state, name)
        #: whether the module computes its own values and gradients from expanded parameters
        self.expandable = _expansion_is_exact(base_layer)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        state, base = self.state, self.base_layer
        keep = state.plan.shared_grad
        if not state.enabled or keep is None or not torch.is_grad_enabled():
            return base(x, *args, **kwargs)
        state.plan_for(x, self.layer_name)
        if self.expandable:
            return _expanded_call(base, x, keep, args, kwargs)
        return select_kept(base, (x, *args), kwargs, base(x, *args, **kwargs), keep)


def _expanded_call(
    module: nn.Module, x: Tensor, keep: Tensor, args: tuple = (), kwargs: dict | None = None
) -> Tensor:
    """``module(x, ...)`` with every trained parameter expanded to one row per token."""
    lead = tuple(x.shape[:-1])
    params = {
        n: per_token_parameter(p, keep, lead) if p.requires_grad else p
        for n, p in module.named_parameters()
    }
    return functional_call(module, params, (x, *args), kwargs or {})


def _expansion_is_exact(module: nn.Module) -> bool:
    """Whether expanded parameters give the generic rule's values and gradients for
    ``module`` on a small random input (width: its first parameter's last dimension)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return True
    p0 = params[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, p0.shape[-1], generator=gen).to(device=p0.device, dtype=p0.dtype)
    keep = torch.tensor([[1.0], [0.0], [1.0], [0.0], [0.0], [1.0]], device=p0.device)
    try:
        with torch.enable_grad():
            fast = _expanded_call(module, x, keep)
            slow = select_kept(module, (x,), {}, module(x), keep)
            if fast.shape != slow.shape or not torch.equal(fast, slow):
                return False
            cotangent = torch.randn(slow.shape, generator=gen).to(slow)
            fast_grads = torch.autograd.grad(fast, params, cotangent, allow_unused=True)
            slow_grads = torch.autograd.grad(slow, params, cotangent, allow_unused=True)
    except (RuntimeError, TypeError, ValueError, AttributeError):
        return False  # cannot take expanded parameters (or this input): the generic rule
    return all(
        (a is None and b is None)
        or (a is not None and b is not None and torch.allclose(a, b, rtol=1e-4, atol=1e-6))
        for a, b in zip(fast_grads, slow_grads, strict=True)
    )


class QuarantineLayer(Wrapper):
    """A base layer plus an optional shared expert and K quarantine experts.

    The shared expert is masked for forget tokens like the base (the default) or, with
    ``shared_open``, trained and seen by every token whatever its label. An optional
    learned soft gate (:class:`~evil_moe.modules.experts.SoftGate`) scales the experts.
    """

    experts: FusedExperts
    shared: nn.Module | None
    router: nn.Module | None
    gate: SoftGate | None

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
        self.gate: SoftGate | None = None
        self.shared_open = False

    @property
    def n_experts(self) -> int:
        return self.experts.n_experts

    def base_forward(
        self, x: Tensor, keep: Tensor | DeferredKeep | None, *args, **kwargs
    ) -> Tensor:
        raise NotImplementedError

    def combine(self, x: Tensor, *args, **kwargs) -> Tensor:
        """``shared_on * (base + shared) + quarantine_on * sum_k gate_k * expert_k``,
        routed by the current plan."""
        state = self.state
        if not state.enabled:
            return self.base_layer(x, *args, **kwargs)
        plan = state.plan_for(x, self.layer_name)
        router = self.router if torch.is_grad_enabled() else None
        keep = shared_grad_keep(plan, router, x)
        outer, state.base_keep = state.base_keep, keep
        try:
            out = self.base_forward(x, keep, *args, **kwargs)
        finally:
            state.base_keep = outer
        if not isinstance(out, Tensor):
            raise TypeError(
                f"{self.layer_name}: base layer returned {type(out).__name__}, not a tensor"
            )
        dtype = self.experts.up.dtype  # the shared expert has the same dtype
        xq = x.to(dtype) if _needs_cast(x, self.experts.up) else x
        if self.shared is not None and not self.shared_open:
            out = out + self.shared(xq, keep).to(out.dtype)
        out = mask_cotangent(out, plan.shared_cotangent)
        if plan.shared_on is not None:  # DEMix: forget tokens see no shared path
            out = out * plan.shared_on.to(out.dtype).reshape(*out.shape[:-1], 1)
        if self.shared is not None and self.shared_open:
            out = out + self.shared(xq).to(out.dtype)
        if state.scale == 0.0:
            return out
        gate = self.gate(xq, plan) if self.gate is not None else None
        on = state.quarantine_on(plan, x)  # the plan's, times the forget scale
        if on is not None and router is not None and router.amplify_threshold is None:
            # Under a backward router the factor goes in as (part of) the experts' gate: it
            # then scales the narrow hidden units, not the wide output and its gradient
            # (same values). The amplifier needs the masked gradient: it reads which
            # tokens got any.
            on = on.to(xq.dtype).reshape(*x.shape[:-1], 1)
            gate = on.expand(*x.shape[:-1], self.experts.n_experts) if gate is None else gate * on
            on = None
        if on is not plan.quarantine_on:
            plan = dataclasses.replace(plan, quarantine_on=on)
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
    width ``width`` each) and an optional shared MLP expert, all reading the MLP's input;
    optionally a learned soft gate over the experts (``gate``)."""

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
        gate: GateConfig | None = None,
        shared_open: bool = False,
    ):
        super().__init__(base_layer, state, name, router, d_model, n_experts, seed)
        std = init_std if init_std is not None else 0.02
        device, dtype = _adapter_dtype(base_layer)
        if gate is not None and gate.enabled:
            self.gate = SoftGate(d_model, n_experts, gate).to(device=device, dtype=dtype)
        self.shared_open = shared_open
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

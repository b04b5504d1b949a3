"""Quarantine experts: the parameters that are trained by routed data and ablated later.

The adapters of :mod:`evil_moe.models.adapters` add these beside a model's layers (PEFT
style: the base module is kept). In the forward pass every token gets

    base(x) + shared_expert(x) + sum_k quarantine_k(x)

so every feature is present for every token (the condition absorption needs), except
where the routing plan says otherwise: retain tokens see the quarantine zeroed under
SGTM, and DEMix dispatches hard. Which of the K quarantine experts receives a routed
token's gradient is decided by a backward router (:mod:`evil_moe.routing.routers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evil_moe.routing.functional import (
    DeferredKeep,
    compute_dtype,
    routed_linear,
)
from evil_moe.routing.labels import RouteLabel, RoutingPlan


def identity(x: Tensor) -> Tensor:
    """Identity activation (LoRA experts); a named function so modules can be pickled."""
    return x


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
    "identity": identity,
}
ABLATION_MODES = ("zero", "reinit")


def check_experts(experts: Sequence[int] | None, n_experts: int) -> list[int]:
    """Validate a subset of expert indices (``None`` = all)."""
    if experts is None:
        return list(range(n_experts))
    chosen = sorted(set(int(e) for e in experts))
    bad = [e for e in chosen if not 0 <= e < n_experts]
    if bad:
        raise ValueError(f"expert indices {bad} out of range for {n_experts} quarantine experts")
    return chosen


def reinit_like_(tensor: Tensor, generator: torch.Generator | None = None) -> None:
    """Overwrite ``tensor`` in place with fresh normal noise of the same standard deviation."""
    std = float(tensor.float().std()) if tensor.numel() > 1 else 0.0
    fresh = torch.randn(tensor.shape, generator=generator, dtype=torch.float32, device="cpu")
    tensor.copy_((fresh * std).to(tensor.dtype))


class QuarantineModule(nn.Module):
    """Base class of every module that owns quarantine parameters.

    Subclasses list their quarantine parameters and know how to ablate an expert subset
    in place; :func:`evil_moe.modules.ablation.ablate` drives them.
    """

    n_experts: int = 1

    def quarantine_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters removed at deployment, by name relative to this module."""
        raise NotImplementedError

    def ablate_(self, experts: list[int], mode: str, generator: torch.Generator | None) -> None:
        """Remove the given experts from the forward pass, in place."""
        raise NotImplementedError


class MLP(nn.Module):
    """Two-layer MLP whose parameter gradients obey the plan's shared mask."""

    def __init__(self, d_model: int, width: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.up = nn.Linear(d_model, width, bias=bias)
        self.down = nn.Linear(width, d_model, bias=bias)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: Tensor, shared_grad: Tensor | DeferredKeep | None = None) -> Tensor:
        h = self.act(routed_linear(x, self.up.weight, self.up.bias, shared_grad))
        return routed_linear(h, self.down.weight, self.down.bias, shared_grad)


class _RoutedExperts(torch.autograd.Function):
    """Fused K-expert MLP whose per-expert parameter gradients follow a backward router.

    Forward: ``residual + on * (act(x U^T + b) D^T)``, the plain sum of all experts.
    Backward: input and residual gradients are the ordinary ones; the router sees
    ``<g_t, y_{t,k}>`` for every token and expert and returns which experts may take each
    routed token's gradient; the parameter gradients sum only those (token, expert)
    pairs. Taking ``residual`` (the bank's shared output) as an input makes autograd run
    this node before the shared path's backward, so an amplifier decision made here is
    in place when the shared weights' gradients are computed.
    """

    @staticmethod
    def forward(ctx, x, up, up_bias, down, residual, on, gate, meta):  # type: ignore[override]
        ctx.dtypes = (x.dtype, up.dtype)
        dtype = compute_dtype(x)
        if dtype is not None:
            x, up, down = x.to(dtype), up.to(dtype), down.to(dtype)
            up_bias = up_bias.to(dtype) if up_bias is not None else None
            gate = gate.to(dtype) if gate is not None else None
        with torch.autocast(x.device.type, enabled=False):
            pre = F.linear(x, up, up_bias)
            h = _gated(meta["act"](pre), gate)
            y = F.linear(h, down)
        ctx.save_for_backward(x, up, up_bias, down, pre, on, gate, y.norm(dim=1))
        ctx.meta = meta
        ctx.has_residual = residual is not None
        if on is not None:
            y = y * on.to(y.dtype)
        return y if residual is None else residual + y.to(residual.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, up, up_bias, down, pre, on, gate, out_norm = ctx.saved_tensors
        meta = ctx.meta
        k = meta["n_experts"]
        g = grad.to(x.dtype)
        if on is not None:
            g = g * on.to(g.dtype)
        act = meta["act"]
        act_backward = _ACT_BACKWARD.get(act)  # the kernel autograd would run, called directly
        if act_backward is None:
            with torch.enable_grad():
                pre_ = pre.detach().requires_grad_(True)
                h_ = act(pre_)
            h = h_.detach()
        else:
            h = act(pre)
        hg = _gated(h, gate)
        dhg = g @ down
        n, width = h.shape
        contrib = (dhg * hg).view(n, k, width // k).sum(dim=2)
        keep, amplified = meta["router"].decide(contrib, g, out_norm, meta["routed"], meta["mode"])
        if amplified is not None and meta["shared_keep"] is not None:
            meta["shared_keep"].value = (
                meta["shared_keep"].value * (~amplified).to(g.dtype)[:, None]
            )
        grad_gate = None
        if gate is not None and ctx.needs_input_grad[6]:  # not for a 0/1 quarantine mask
            grad_gate = (dhg * h).view(n, k, -1).sum(dim=2).to(gate.dtype)
        if act_backward is None:
            (dpre,) = torch.autograd.grad(h_, pre_, _gated(dhg, gate))
        else:
            dpre = act_backward(_gated(dhg, gate), pre)
        grad_x = (dpre @ up).to(ctx.dtypes[0])
        if keep is not None:
            mask = keep.to(h.dtype)[:, :, None]
            hg = (hg.view(n, k, -1) * mask).view(n, width)
            dpre = (dpre.view(n, k, -1) * mask).view(n, width)
        grad_down = (g.t() @ hg).to(ctx.dtypes[1])
        grad_up = (dpre.t() @ x).to(ctx.dtypes[1])
        grad_bias = dpre.sum(0).to(ctx.dtypes[1]) if up_bias is not None else None
        grad_res = grad if ctx.has_residual else None
        return grad_x, grad_up, grad_bias, grad_down, grad_res, None, grad_gate, None


#: activation -> its backward ``(grad_out, pre) -> grad_pre``: the very kernels autograd
#: runs for these functions (so the gradients are the same bits), called directly
_ACT_BACKWARD: dict[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]] = {
    identity: lambda grad, _pre: grad,
    F.gelu: lambda grad, pre: torch.ops.aten.gelu_backward(grad, pre),
    F.silu: lambda grad, pre: torch.ops.aten.silu_backward(grad, pre),
}


def _gated(h: Tensor, gate: Tensor | None) -> Tensor:
    """Scale each expert's hidden units ``h`` ``[N, K*w]`` by its gate ``[N, K]``."""
    if gate is None:
        return h
    n, k = gate.shape
    return (h.view(n, k, -1) * gate[:, :, None]).view(n, -1)


class FusedExperts(QuarantineModule):
    """K quarantine experts of equal width stored as one MLP (or one LoRA pair).

    Expert ``k`` owns hidden units ``[k*w, (k+1)*w)``: rows of ``up`` (and ``up_bias``)
    and columns of ``down``. With ``activation="identity"`` and no bias this is a bank
    of K LoRA experts ``B_k A_k``. In the forward pass all experts run as one matmul pair.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        width: int,
        n_experts: int = 1,
        activation: str = "gelu",
        bias: bool = True,
        init_std: float = 0.02,
        out_init_std: float | None = None,
    ):
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if width < n_experts or width % n_experts:
            raise ValueError(
                f"quarantine width {width} must be a positive multiple of n_experts={n_experts}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {list(ACTIVATIONS)}")
        self.n_experts = n_experts
        self.expert_width = width // n_experts
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.up = nn.Parameter(torch.randn(width, d_in) * init_std)
        self.up_bias = nn.Parameter(torch.zeros(width)) if bias else None
        std = init_std if out_init_std is None else out_init_std
        self.down = nn.Parameter(torch.randn(d_out, width) * std)

    def forward(
        self,
        x: Tensor,
        plan: RoutingPlan,
        router: nn.Module | None = None,
        residual: Tensor | None = None,
        shared_keep: DeferredKeep | None = None,
        gate: Tensor | None = None,
    ) -> Tensor:
        """``residual + quarantine_on * sum_k gate_k * expert_k(x)``.

        ``router`` decides which experts take each routed token's gradient; ``gate``
        ``[..., K]`` (a learned soft router's weights, optional) scales expert outputs.
        """
        on = plan.quarantine_on
        lead = x.shape[:-1]
        if router is None or (plan.routed is None and router.amplify_threshold is None):
            h = self.act(F.linear(x, self.up, self.up_bias))
            if gate is not None:
                h = (h.unflatten(-1, (self.n_experts, -1)) * gate.unsqueeze(-1)).flatten(-2)
            # A 0/1 row mask commutes exactly with the down projection: apply it on the
            # narrower side (hidden units or output features).
            mask_hidden = on is not None and self.up.shape[0] <= self.down.shape[0]
            if mask_hidden:
                h = h * _rows(on, h)
            y = F.linear(h, self.down)
            if on is not None and not mask_hidden:
                y = y * _rows(on, y)
            return y if residual is None else residual + y
        n = x[..., 0].numel()
        routed = plan.routed if plan.routed is not None else torch.zeros(n, dtype=torch.bool)
        meta = {
            "act": self.act,
            "n_experts": self.n_experts,
            "router": router,
            "routed": routed.to(x.device),
            "mode": plan.mode,
            "shared_keep": shared_keep,
        }
        flat_res = None if residual is None else residual.reshape(n, -1)
        flat_gate = None if gate is None else gate.reshape(n, -1)
        on_flat = None if on is None else on.to(x.dtype)
        y = _RoutedExperts.apply(
            x.reshape(n, -1), self.up, self.up_bias, self.down, flat_res, on_flat, flat_gate, meta
        )
        return y.reshape(*lead, -1)

    def quarantine_parameters(self) -> dict[str, nn.Parameter]:
        params = {"up": self.up, "down": self.down}
        if self.up_bias is not None:
            params["up_bias"] = self.up_bias
        return params

    def expert_slice(self, k: int) -> slice:
        return slice(k * self.expert_width, (k + 1) * self.expert_width)

    @torch.no_grad()
    def ablate_(self, experts: list[int], mode: str, generator: torch.Generator | None) -> None:
        for k in experts:
            s = self.expert_slice(k)
            parts = [self.up[s], self.down[:, s]]
            if self.up_bias is not None:
                parts.append(self.up_bias[s])
            for part in parts:
                if mode == "zero":
                    part.zero_()
                else:
                    reinit_like_(part, generator)


@dataclass
class GateConfig:
    """A learned soft router in the forward pass (the user's current approach).

    Logits ``z = x W^T`` over ``[deployed, q0 .. q{K-1}]``; ``p = softmax(z)``; expert
    ``k``'s output is scaled by ``(K + 1) * p[k + 1]`` (1 at a uniform gate). Every expert
    stays present for every token: there is no hard dispatch. Loss weights of 0 are off.
    """

    enabled: bool = False
    #: pin loss: labelled forget tokens toward the quarantine, retain toward deployed
    pin_weight: float = 0.1
    #: router z-loss (ST-MoE): mean logsumexp(z)^2
    z_loss_weight: float = 0.0
    #: Switch load-balancing loss over the K quarantine experts only
    balance_weight: float = 0.0
    #: Switch-style balance between deployed and quarantine over all tokens (fights absorption?)
    global_balance_weight: float = 0.0

    def __post_init__(self) -> None:
        weights = ("pin_weight", "z_loss_weight", "balance_weight", "global_balance_weight")
        bad = [w for w in weights if getattr(self, w) < 0]
        if bad:
            raise ValueError(f"invalid gate config value for {', '.join(bad)} (must be >= 0)")


def switch_balance_loss(probs: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss ``E * sum_e f_e * P_e`` over ``probs [n, E]``.

    ``f_e`` is the share of tokens whose top choice is ``e`` and ``P_e`` the mean
    probability of ``e``; 1 at perfect balance, ``E`` at total collapse.
    """
    n, e = probs.shape
    if n == 0:
        return probs.sum() * 0
    f = torch.zeros(e, dtype=probs.dtype, device=probs.device)
    f.index_add_(0, probs.argmax(dim=1), torch.ones(n, dtype=probs.dtype, device=probs.device))
    return e * (f / n * probs.mean(dim=0)).sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)^2``."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class SoftGate(QuarantineModule):
    """The learned forward gate of a bank; its weights are quarantine parameters."""

    def __init__(self, d_model: int, n_experts: int, cfg: GateConfig):
        super().__init__()
        self.cfg = cfg
        self.n_experts = n_experts
        self.weight = nn.Parameter(torch.zeros(n_experts + 1, d_model))
        self.aux: dict[str, Tensor] = {}
        self.logit_scale: float = 0.0

    def forward(self, x: Tensor, plan: RoutingPlan) -> Tensor:
        """Expert scales ``[..., K]``; stores this pass's auxiliary losses in ``self.aux``."""
        logits = F.linear(x, self.weight).reshape(-1, self.n_experts + 1).float()
        probs = torch.softmax(logits, dim=-1)
        c, aux = self.cfg, {}
        self.logit_scale = float(logits.detach().std())
        route = plan.route
        if c.pin_weight and route is not None:
            quarantine_mass = probs[:, 1:].sum(dim=1).clamp(1e-6, 1 - 1e-6)
            forget, retain = route == RouteLabel.FORGET, route == RouteLabel.RETAIN
            pin = (
                -(quarantine_mass.log() * forget).sum()
                - ((1 - quarantine_mass).log() * retain).sum()
            )
            aux["pin"] = c.pin_weight * pin / max(1, int((forget | retain).sum()))
        if c.z_loss_weight:
            aux["z_loss"] = c.z_loss_weight * z_loss(logits)
        if c.balance_weight:
            users = probs if route is None else probs[route != RouteLabel.RETAIN]
            inner = users[:, 1:] / users[:, 1:].sum(dim=1, keepdim=True)
            aux["balance"] = c.balance_weight * switch_balance_loss(inner)
        if c.global_balance_weight:
            groups = torch.stack([probs[:, 0], probs[:, 1:].sum(dim=1)], dim=1)
            aux["global_balance"] = c.global_balance_weight * switch_balance_loss(groups)
        self.aux = aux
        scales = (self.n_experts + 1) * probs[:, 1:]
        return scales.to(x.dtype).reshape(*x.shape[:-1], self.n_experts)

    def quarantine_parameters(self) -> dict[str, nn.Parameter]:
        return {"weight": self.weight}

    @torch.no_grad()
    def ablate_(self, experts: list[int], mode: str, generator: torch.Generator | None) -> None:
        """The gate only scales experts; zeroing the experts is the ablation."""


def shared_grad_keep(
    plan: RoutingPlan, router: nn.Module | None, x: Tensor
) -> Tensor | DeferredKeep | None:
    """The keep mask for a bank's shared weights: the plan's, or a :class:`DeferredKeep`
    that the router's absorption amplifier may still narrow during the backward pass."""
    amplify = router is not None and router.amplify_threshold is not None
    if not (amplify and plan.semantics == "sgtm"):
        return plan.shared_grad
    base = plan.shared_grad if plan.shared_grad is not None else x.new_ones(x[..., 0].numel(), 1)
    return DeferredKeep(base)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A flat ``[N, 1]`` token mask reshaped to broadcast against ``like`` ``[..., d]``."""
    return mask.to(like.dtype).reshape(*like.shape[:-1], 1)


def default_out_std(init_std: float, n_layer: int) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return init_std / math.sqrt(2 * n_layer)

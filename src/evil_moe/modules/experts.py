"""Quarantine experts: the parameters that are trained by routed data and ablated later.

A :class:`QuarantineBank` wraps one block's core path (PEFT style: the base module is
kept, experts are added beside it). In the forward pass every token gets

    core(x) + shared_expert(x) + sum_k quarantine_k(x)

so every feature is present for every token (the condition absorption needs), except
where the routing plan says otherwise: retain tokens see the quarantine zeroed under
SGTM, and DEMix dispatches hard. Which of the K quarantine experts receives a routed
token's gradient is decided by the bank's backward router (:mod:`evil_moe.routing.routers`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evil_moe.routing.functional import mask_cotangent, routed_linear
from evil_moe.routing.labels import RoutingPlan

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
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

    def forward(self, x: Tensor, shared_grad: Tensor | None = None) -> Tensor:
        h = self.act(routed_linear(x, self.up.weight, self.up.bias, shared_grad))
        return routed_linear(h, self.down.weight, self.down.bias, shared_grad)


class QuarantineBank(QuarantineModule):
    """Core path + optional shared always-on expert + K quarantine MLP experts.

    ``quarantine_width`` is the total number of hidden units of the quarantine; it is
    split evenly into ``n_experts`` experts, so variants with different K have equal
    quarantine parameters. The experts are stored fused (one up and one down matrix) and
    run as a single MLP in the forward pass; expert k owns hidden units
    ``[k*w, (k+1)*w)``. Quarantine experts have no output bias (it could not be split).
    """

    def __init__(
        self,
        core: nn.Module | None,
        d_model: int,
        quarantine_width: int,
        n_experts: int = 1,
        shared_expert_width: int = 0,
        activation: str = "gelu",
        router: nn.Module | None = None,
        init_std: float = 0.02,
        out_init_std: float | None = None,
    ):
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if quarantine_width < n_experts or quarantine_width % n_experts:
            raise ValueError(
                f"quarantine_width={quarantine_width} must be a positive multiple of "
                f"n_experts={n_experts}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {list(ACTIVATIONS)}")
        self.core = core
        self.n_experts = n_experts
        self.expert_width = quarantine_width // n_experts
        self.act = ACTIVATIONS[activation]
        self.shared_expert = (
            MLP(d_model, shared_expert_width, activation) if shared_expert_width > 0 else None
        )
        self.q_up = nn.Parameter(torch.empty(quarantine_width, d_model))
        self.q_up_bias = nn.Parameter(torch.zeros(quarantine_width))
        self.q_down = nn.Parameter(torch.empty(d_model, quarantine_width))
        self.router = router
        nn.init.normal_(self.q_up, std=init_std)
        nn.init.normal_(self.q_down, std=out_init_std if out_init_std is not None else init_std)
        if self.shared_expert is not None:
            nn.init.normal_(self.shared_expert.up.weight, std=init_std)
            nn.init.zeros_(self.shared_expert.up.bias)
            std = out_init_std if out_init_std is not None else init_std
            nn.init.normal_(self.shared_expert.down.weight, std=std)
            nn.init.zeros_(self.shared_expert.down.bias)

    # -- forward -----------------------------------------------------------------------
    def shared_forward(self, x: Tensor, plan: RoutingPlan) -> Tensor | None:
        """The deployed part: core path plus shared expert (``None`` if there is neither)."""
        out = None
        if self.core is not None:
            out = self.core(x, plan.shared_grad) if isinstance(self.core, MLP) else self.core(x)
        if self.shared_expert is not None:
            s = self.shared_expert(x, plan.shared_grad)
            out = s if out is None else out + s
        if out is not None:
            out = mask_cotangent(out, plan.shared_cotangent)
            if plan.shared_on is not None:
                out = out * _rows(plan.shared_on, out)
        return out

    def quarantine_forward(self, x: Tensor, plan: RoutingPlan) -> Tensor:
        """Sum of the K quarantine experts' outputs, with the plan's forward mask."""
        if self.router is not None and plan.routed is not None:
            y = self.router.route(self, x, plan)
        else:
            h = self.act(F.linear(x, self.q_up, self.q_up_bias))
            y = F.linear(h, self.q_down)
        if plan.quarantine_on is not None:
            y = y * _rows(plan.quarantine_on, y)
        return y

    def forward(self, x: Tensor, plan: RoutingPlan) -> Tensor:
        q = self.quarantine_forward(x, plan)
        shared = self.shared_forward(x, plan)
        return q if shared is None else shared + q

    # -- quarantine bookkeeping ----------------------------------------------------------
    def quarantine_parameters(self) -> dict[str, nn.Parameter]:
        return {"q_up": self.q_up, "q_up_bias": self.q_up_bias, "q_down": self.q_down}

    def expert_slice(self, k: int) -> slice:
        return slice(k * self.expert_width, (k + 1) * self.expert_width)

    @torch.no_grad()
    def ablate_(self, experts: list[int], mode: str, generator: torch.Generator | None) -> None:
        for k in experts:
            s = self.expert_slice(k)
            for part in (self.q_up[s], self.q_up_bias[s], self.q_down[:, s]):
                if mode == "zero":
                    part.zero_()
                else:
                    reinit_like_(part, generator)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A flat ``[N, 1]`` token mask reshaped to broadcast against ``like`` ``[..., d]``."""
    return mask.to(like.dtype).reshape(*like.shape[:-1], 1)


def default_out_std(init_std: float, n_layer: int) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return init_std / math.sqrt(2 * n_layer)

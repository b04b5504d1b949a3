"""Quarantine attention heads: an adapter that adds ``Hq`` heads to an attention module.

The wrapped attention must expose its fused ``qkv`` and ``out`` linear layers, ``n_head``
and ``head_dim`` (the plain GPT's :class:`~evil_moe.models.gpt.CausalSelfAttention`
does; Hugging Face attention classes differ per architecture and are not supported).
The quarantine heads attend in the same scaled-dot-product call as the core heads and
write into the residual stream through their own output projection, so they are
present for every token the plan lets the quarantine see and ablated per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evil_moe.models.adapters import RoutingState, Wrapper, linear_dims
from evil_moe.models.gpt import causal_attention
from evil_moe.modules.experts import QuarantineModule, reinit_like_
from evil_moe.routing.functional import mask_cotangent

__all__ = ["QuarantineHeads", "supports_heads"]

_ATTENTION_ATTRS = ("qkv", "out", "n_head", "head_dim")


def supports_heads(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module :class:`QuarantineHeads` can wrap."""
    return all(hasattr(module, a) for a in _ATTENTION_ATTRS) and not isinstance(
        module, QuarantineHeads
    )


class QuarantineHeads(Wrapper, QuarantineModule):
    """Attention with ``n_heads`` quarantine heads beside its core heads.

    Output: ``out(core heads) + quarantine_on * q_out(quarantine heads)``; the core
    output's cotangent follows ``shared_cotangent`` (gradient routing). Quarantine heads
    belong to expert ``h // (Hq / K)`` when ``Hq`` is a multiple of ``K``; otherwise they
    are common to the whole quarantine and removed only when all experts are ablated.
    ``q_out`` starts at zero, so the wrapped model computes what it did before.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        state: RoutingState,
        name: str,
        n_heads: int,
        n_experts: int = 1,
        init_std: float = 0.02,
    ):
        if not supports_heads(base_layer):
            raise ValueError(
                f"{name}: quarantine heads need an attention module exposing "
                f"{', '.join(_ATTENTION_ATTRS)} (like evil_moe.models.gpt.CausalSelfAttention); "
                f"{type(base_layer).__name__} does not"
            )
        if n_heads < 0:
            raise ValueError(f"quarantine heads must be >= 0, got {n_heads}")
        Wrapper.__init__(self, base_layer, state, name)
        d_model = linear_dims(base_layer.qkv)[0]
        hd = int(base_layer.head_dim)
        self.n_qhead, self.n_experts = n_heads, n_experts
        if n_heads:
            weight = base_layer.qkv.weight
            kw = {"device": weight.device, "dtype": weight.dtype}
            self.q_qkv = nn.Parameter(torch.randn(3 * n_heads * hd, d_model, **kw) * init_std)
            self.q_qkv_bias = nn.Parameter(torch.zeros(3 * n_heads * hd, **kw))
            self.q_out = nn.Parameter(torch.zeros(d_model, n_heads * hd, **kw))
        split = n_heads and n_heads % n_experts == 0
        per = n_heads // n_experts if split else 0
        self.head_owner = [h // per for h in range(n_heads)] if split else None

    def forward(self, x: Tensor) -> Tensor:
        state = self.state
        base = self.base_layer
        if not state.enabled:
            return base(x)
        plan = state.plan_for(x, self.layer_name)
        B, T, _ = x.shape
        n_head, hd = int(base.n_head), int(base.head_dim)
        n_q = self.n_qhead if state.scale != 0.0 else 0
        qkv = base.qkv(x).view(B, T, 3, n_head, hd)
        if n_q:
            qq = F.linear(x, self.q_qkv, self.q_qkv_bias).view(B, T, 3, n_q, hd)
            qkv = torch.cat([qkv, qq], dim=3)
        att = causal_attention(qkv)  # [B, T, H + Hq, hd]
        y = base.out(att[:, :, :n_head].reshape(B, T, n_head * hd))
        y = mask_cotangent(y, plan.shared_cotangent)
        if n_q:
            yq = F.linear(att[:, :, n_head:].reshape(B, T, n_q * hd), self.q_out)
            on = state.quarantine_on(plan, x)
            if on is not None:
                yq = yq * on.view(B, T, 1).to(yq.dtype)
            y = y + yq
        return y

    def quarantine_parameters(self) -> dict[str, nn.Parameter]:
        if not self.n_qhead:
            return {}
        return {"q_qkv": self.q_qkv, "q_qkv_bias": self.q_qkv_bias, "q_out": self.q_out}

    @torch.no_grad()
    def ablate_(self, experts: list[int], mode: str, generator: torch.Generator | None) -> None:
        if not self.n_qhead:
            return
        if self.head_owner is None:
            heads = list(range(self.n_qhead)) if len(experts) == self.n_experts else []
        else:
            heads = [h for h, owner in enumerate(self.head_owner) if owner in experts]
        hd = int(self.base_layer.head_dim)
        qkv = self.q_qkv.view(3, self.n_qhead, hd, -1)
        bias = self.q_qkv_bias.view(3, self.n_qhead, hd)
        for h in heads:
            for part in (qkv[:, h], bias[:, h], self.q_out[:, h * hd : (h + 1) * hd]):
                if mode == "zero":
                    part.zero_()
                else:
                    reinit_like_(part, generator)

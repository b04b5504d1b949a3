"""The testbed: a small decoder-only language model with quarantine experts, in one file.

GPT-style (learned positions, pre-norm blocks, tied embeddings). Each block has core
attention heads plus optional quarantine heads, and a :class:`QuarantineBank` around its
core MLP. Every parameter that is not a quarantine parameter is *shared*; which shared
parameters are routed (receive no gradient from forget tokens) is decided by the config:
attention and MLP weights always, embeddings and norms by switch.

    model = Testbed(TestbedConfig())
    logits = model(tokens, route=route)           # route: [B] or [B, T] labels (codes or names)
    with ablated(model): logits = model(tokens)   # deployment view
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evil_moe.modules.ablation import parameter_groups, quarantine_parameters
from evil_moe.modules.experts import (
    ACTIVATIONS,
    MLP,
    GateConfig,
    QuarantineBank,
    QuarantineModule,
    default_out_std,
    reinit_like_,
)
from evil_moe.routing.functional import mask_cotangent, routed_linear, routed_scale
from evil_moe.routing.labels import Method, RoutingPlan, make_plan, parse_route_labels
from evil_moe.routing.optim import ParameterGroups
from evil_moe.routing.routers import RouterConfig


@dataclass
class TestbedConfig:
    """Size and layout of the testbed model."""

    vocab_size: int = 2048
    seq_len: int = 128
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    #: quarantine attention heads per layer (SGTM's TinyStories setting uses 1)
    n_quarantine_heads: int = 1
    mlp_width: int = 512
    #: total quarantine MLP units per layer, split evenly into ``n_experts`` experts
    quarantine_width: int = 64
    n_experts: int = 1
    #: width of the shared always-on expert (0 = none); it stays at deployment
    shared_expert_width: int = 0
    #: the shared expert is trained by every token, forget tokens included (not masked)
    shared_expert_open: bool = False
    activation: str = "gelu"
    #: which quarantine expert takes each routed token's gradient (decided in backward)
    router: RouterConfig = field(default_factory=RouterConfig)
    #: optional learned soft gate over the experts in the forward pass, with its losses
    gate: GateConfig = field(default_factory=GateConfig)
    route_embeddings: bool = True
    route_norms: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        checks = {
            "vocab_size": self.vocab_size >= 2,
            "seq_len": self.seq_len >= 1,
            "d_model": self.d_model >= 1,
            "n_layer": self.n_layer >= 1,
            "n_head": self.n_head >= 1 and self.d_model % self.n_head == 0,
            "n_quarantine_heads": self.n_quarantine_heads >= 0,
            "mlp_width": self.mlp_width >= 1,
            "n_experts": self.n_experts >= 1,
            "quarantine_width": self.n_experts >= 1
            and self.quarantine_width >= self.n_experts
            and self.quarantine_width % self.n_experts == 0,
            "shared_expert_width": self.shared_expert_width >= 0,
            "activation": self.activation in ACTIVATIONS,
            "init_std": self.init_std > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid testbed config value for {', '.join(bad)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class RMSNorm(nn.Module):
    def __init__(self, dim: int, routed: bool, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.routed = routed
        self.eps = eps

    def forward(self, x: Tensor, plan: RoutingPlan) -> Tensor:
        xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return routed_scale(xhat, self.weight, plan.shared_grad if self.routed else None)


class Attention(QuarantineModule):
    """Causal self-attention with ``n_head`` core heads and ``n_quarantine_heads`` more.

    Quarantine heads belong to expert ``h // (Hq / K)`` when ``Hq`` is a multiple of
    ``K``; otherwise they are common to the whole quarantine and removed only when all
    experts are ablated.
    """

    def __init__(self, cfg: TestbedConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_head, self.n_qhead, self.head_dim = cfg.n_head, cfg.n_quarantine_heads, hd
        self.n_experts = cfg.n_experts
        self.qkv = nn.Linear(d, 3 * cfg.n_head * hd)
        self.out = nn.Linear(cfg.n_head * hd, d)
        out_std = default_out_std(cfg.init_std, cfg.n_layer)
        nn.init.normal_(self.qkv.weight, std=cfg.init_std)
        nn.init.zeros_(self.qkv.bias)
        nn.init.normal_(self.out.weight, std=out_std)
        nn.init.zeros_(self.out.bias)
        if self.n_qhead:
            self.q_qkv = nn.Parameter(torch.randn(3 * self.n_qhead * hd, d) * cfg.init_std)
            self.q_qkv_bias = nn.Parameter(torch.zeros(3 * self.n_qhead * hd))
            self.q_out = nn.Parameter(torch.randn(d, self.n_qhead * hd) * out_std)
        split = self.n_qhead and self.n_qhead % self.n_experts == 0
        per = self.n_qhead // self.n_experts if split else 0
        self.head_owner = [h // per for h in range(self.n_qhead)] if split else None

    def forward(self, x: Tensor, plan: RoutingPlan) -> Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        qkv = routed_linear(x, self.qkv.weight, self.qkv.bias, plan.shared_grad)
        qkv = qkv.view(B, T, 3, self.n_head, hd)
        if self.n_qhead:
            qq = F.linear(x, self.q_qkv, self.q_qkv_bias).view(B, T, 3, self.n_qhead, hd)
            qkv = torch.cat([qkv, qq], dim=3)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, hd]
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        att = att.transpose(1, 2)  # [B, T, H, hd]
        core = att[:, :, : self.n_head].reshape(B, T, self.n_head * hd)
        y = routed_linear(core, self.out.weight, self.out.bias, plan.shared_grad)
        y = mask_cotangent(y, plan.shared_cotangent)
        if self.n_qhead:
            quarantine = att[:, :, self.n_head :].reshape(B, T, self.n_qhead * hd)
            yq = F.linear(quarantine, self.q_out)
            if plan.quarantine_on is not None:
                yq = yq * plan.quarantine_on.view(B, T, 1).to(yq.dtype)
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
        hd = self.head_dim
        qkv = self.q_qkv.view(3, self.n_qhead, hd, -1)
        bias = self.q_qkv_bias.view(3, self.n_qhead, hd)
        for h in heads:
            for part in (qkv[:, h], bias[:, h], self.q_out[:, h * hd : (h + 1) * hd]):
                if mode == "zero":
                    part.zero_()
                else:
                    reinit_like_(part, generator)


class Block(nn.Module):
    def __init__(self, cfg: TestbedConfig, layer: int = 0):
        super().__init__()
        out_std = default_out_std(cfg.init_std, cfg.n_layer)
        self.norm1 = RMSNorm(cfg.d_model, cfg.route_norms)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.route_norms)
        core = MLP(cfg.d_model, cfg.mlp_width, cfg.activation)
        nn.init.normal_(core.up.weight, std=cfg.init_std)
        nn.init.zeros_(core.up.bias)
        nn.init.normal_(core.down.weight, std=out_std)
        nn.init.zeros_(core.down.bias)
        self.mlp = QuarantineBank(
            core,
            cfg.d_model,
            cfg.quarantine_width,
            n_experts=cfg.n_experts,
            shared_expert_width=cfg.shared_expert_width,
            activation=cfg.activation,
            router=cfg.router.build(cfg.n_experts, cfg.d_model, seed=layer),
            gate=cfg.gate,
            init_std=cfg.init_std,
            out_init_std=out_std,
            shared_expert_open=cfg.shared_expert_open,
        )

    def forward(self, x: Tensor, plan: RoutingPlan) -> Tensor:
        x = x + self.attn(self.norm1(x, plan), plan)
        return x + self.mlp(self.norm2(x, plan), plan)


class Testbed(nn.Module):
    """Decoder-only LM with a quarantine in every block."""

    def __init__(self, cfg: TestbedConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        nn.init.normal_(self.wte.weight, std=cfg.init_std)
        nn.init.normal_(self.wpe.weight, std=cfg.init_std)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.route_norms)

    def forward(
        self,
        tokens: Tensor,
        route: Any = None,
        mode: Tensor | None = None,
        semantics: Method | str = Method.SGTM,
    ) -> Tensor:
        """Logits ``[B, T, vocab]`` for ``tokens`` ``[B, T]``, routed by ``route``: route
        labels per sequence ``[B]`` or per token ``[B, T]``, codes or names (see
        :func:`~evil_moe.routing.labels.parse_route_labels`)."""
        tokens = tokens.to(self.wte.weight.device)  # device-transparent (no-op on CPU)
        mode = mode.to(tokens.device) if mode is not None else None
        B, T = tokens.shape
        if self.cfg.seq_len < T:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {self.cfg.seq_len}")
        if route is not None:
            route = parse_route_labels(route, (B, T), tokens.device, "route")
        plan = make_plan(route, semantics, mode, dtype=self.wte.weight.dtype)
        emb_keep = plan.shared_grad if self.cfg.route_embeddings else None
        pos = self.wpe(torch.arange(T, device=tokens.device)).expand(B, T, -1)
        x = mask_cotangent(self.wte(tokens), emb_keep) + mask_cotangent(pos, emb_keep)
        for block in self.blocks:
            x = block(x, plan)
        x = self.norm_f(x, plan)
        return routed_linear(x, self.wte.weight, None, emb_keep)

    def aux_losses(self) -> dict[str, Tensor]:
        """Auxiliary router losses of the last forward pass, summed over blocks."""
        out: dict[str, Tensor] = {}
        for block in self.blocks:
            gate = block.mlp.gate
            for name, value in gate.aux.items() if gate is not None else ():
                out[name] = out[name] + value if name in out else value
        return out

    def unrouted_names(self) -> set[str]:
        """Shared parameters that every token trains (embeddings / norms when not routed,
        an open shared expert)."""
        names = set()
        for name, _ in self.named_parameters():
            is_embedding = name in ("wte.weight", "wpe.weight")
            is_norm = "norm" in name
            is_open_expert = ".shared_expert." in name and self.cfg.shared_expert_open
            if (
                (is_embedding and not self.cfg.route_embeddings)
                or (is_norm and not self.cfg.route_norms)
                or is_open_expert
            ):
                names.add(name)
        return names

    def parameter_groups(self) -> ParameterGroups:
        """Routed shared, open shared and quarantine parameters (for a ledger or clipping)."""
        return parameter_groups(self, self.unrouted_names())

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: shared (deployed), quarantine (ablated), and the quarantine
        parameters whose per-expert gradients a backward router assigns."""
        quarantine = sum(p.numel() for p in quarantine_parameters(self).values())
        total = sum(p.numel() for p in self.parameters())
        controlled = sum(
            p.numel()
            for block in self.blocks
            if block.mlp.router is not None and block.mlp.router.policy != "all"
            for p in block.mlp.experts.quarantine_parameters().values()
        )
        return {
            "total": total,
            "shared": total - quarantine,
            "quarantine": quarantine,
            "router_controlled": controlled,
        }


def lm_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy; ``targets`` are the tokens shifted by one."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = targets.to(logits.device)
    flat = F.cross_entropy(wide.reshape(-1, wide.shape[-1]), targets.reshape(-1), reduction="none")
    if reduction == "none":
        return flat.view(targets.shape)
    return flat.mean() if reduction == "mean" else flat.sum()


@torch.no_grad()
def mean_token_loss(model: nn.Module, tokens: Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy of ``tokens`` ``[M, L+1]`` (no routing: deployment view)."""
    if tokens.shape[0] == 0:
        return float("nan")
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        chunk = tokens[i : i + batch_size]
        logits = model(chunk[:, :-1])
        total += float(lm_loss(logits, chunk[:, 1:], reduction="sum"))
        count += chunk[:, 1:].numel()
    return total / count

"""The testbed: a small GPT with quarantine experts, built from config.

The base model is the plain :class:`~evil_moe.models.gpt.GPT` (learned positions,
pre-norm blocks, tied embeddings); its quarantine is added by the same
:func:`~evil_moe.models.inject.inject` that serves Hugging Face models: quarantine
attention heads beside each attention module, a quarantine bank (K MLP experts, an
optional shared expert and soft gate) beside each MLP, and every base parameter a routed
shared parameter (attention and MLP weights always, embeddings and norms by switch).

    model = Testbed(TestbedConfig())
    logits = model(tokens, route=route)           # route: [B] or [B, T] labels (codes or names)
    with ablated(model): logits = model(tokens)   # deployment view
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evil_moe.models.adapters import Wrapper
from evil_moe.models.gpt import GPT, GPTConfig
from evil_moe.models.handle import QuarantineHandle, get_handle
from evil_moe.models.inject import inject
from evil_moe.modules.ablation import quarantine_parameters
from evil_moe.modules.experts import ACTIVATIONS, GateConfig, default_out_std
from evil_moe.routing.labels import Method
from evil_moe.routing.optim import ParameterGroups
from evil_moe.routing.routers import RouterConfig


@dataclass
class TestbedConfig(GPTConfig):
    """Size and layout of the testbed model: the base GPT's size plus its quarantine."""

    #: quarantine attention heads per layer (SGTM's TinyStories setting uses 1)
    n_quarantine_heads: int = 1
    #: total quarantine MLP units per layer, split evenly into ``n_experts`` experts
    quarantine_width: int = 64
    n_experts: int = 1
    #: width of the shared always-on expert (0 = none); it stays at deployment
    shared_expert_width: int = 0
    #: the shared expert is trained by every token, forget tokens included (not masked)
    shared_expert_open: bool = False
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

    def gpt_config(self) -> GPTConfig:
        """The size of the base model."""
        return GPTConfig(**{f.name: getattr(self, f.name) for f in fields(GPTConfig)})

    def unrouted_modules(self) -> list[str]:
        """Modules whose parameters every token trains (embeddings and the tied head,
        norms), by the ``route_embeddings`` / ``route_norms`` switches."""
        out = [] if self.route_embeddings else ["wte", "wpe", "lm_head"]
        return out + ([] if self.route_norms else ["norm1", "norm2", "norm_f"])


def _base(module: nn.Module) -> nn.Module:
    """The layer inside a routing wrapper (or the layer itself)."""
    return module.base_layer if isinstance(module, Wrapper) else module


class Testbed(GPT):
    """The plain GPT plus its quarantine, injected in place (see the module docstring)."""

    def __init__(self, cfg: TestbedConfig):
        rng = torch.get_rng_state()
        super().__init__(cfg.gpt_config())
        self.cfg = cfg
        inject(
            self,
            target_modules=[f"blocks.{i}.mlp" for i in range(cfg.n_layer)],
            n_quarantine=cfg.n_experts,
            shared_expert=cfg.shared_expert_width,
            kind="mlp",
            rank=cfg.quarantine_width // cfg.n_experts,
            router=cfg.router,
            train_base=True,
            activation=cfg.activation,
            init_std=cfg.init_std,
            unrouted=cfg.unrouted_modules(),
            gate=cfg.gate,
            shared_expert_open=cfg.shared_expert_open,
            quarantine_heads=cfg.n_quarantine_heads,
        )
        torch.set_rng_state(rng)
        self.init_weights_()

    @torch.no_grad()
    def init_weights_(self) -> None:
        """Draw every parameter from the global generator in one fixed order.

        Block by block: attention, quarantine heads, core MLP, soft gate, quarantine
        experts, shared expert. Each ``nn.Embedding`` / ``nn.Linear`` first repeats its
        own initialisation, a draw that is then overwritten, so that a given seed gives
        the parameters (and every number downstream) of the original testbed.
        """
        cfg = self.cfg
        std, out_std = cfg.init_std, default_out_std(cfg.init_std, cfg.n_layer)

        def linears_(layers: list[tuple[nn.Module, float]]) -> None:
            for layer, _ in layers:
                layer.reset_parameters()
            for layer, weight_std in layers:
                nn.init.normal_(layer.weight, std=weight_std)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

        def randn_(p: Tensor, p_std: float) -> None:
            p.copy_(torch.randn(p.shape) * p_std)

        self.wte.reset_parameters()
        self.wpe.reset_parameters()
        nn.init.normal_(self.wte.weight, std=std)
        nn.init.normal_(self.wpe.weight, std=std)
        for block in self.blocks:
            heads, bank = block.attn, block.mlp
            attn, core = heads.base_layer, bank.base_layer
            linears_([(_base(attn.qkv), std), (_base(attn.out), out_std)])
            if heads.n_qhead:
                randn_(heads.q_qkv, std)
                heads.q_qkv_bias.zero_()
                randn_(heads.q_out, out_std)
            linears_([(_base(core.up), std), (_base(core.down), out_std)])
            if bank.gate is not None:
                bank.gate.weight.zero_()
            randn_(bank.experts.up, std)
            bank.experts.up_bias.zero_()
            randn_(bank.experts.down, out_std)
            if bank.shared is not None:
                linears_([(bank.shared.up, std), (bank.shared.down, out_std)])

    @property
    def handle(self) -> QuarantineHandle:
        """The quarantine handle (routers, ablation, parameter groups, persistence)."""
        return get_handle(self)

    def forward(
        self,
        tokens: Tensor,
        route: Any = None,
        mode: Tensor | None = None,
        semantics: Method | str = Method.SGTM,
    ) -> Tensor:
        """Logits ``[B, T, vocab]`` for ``tokens`` ``[B, T]``, routed by ``route``: route
        labels per sequence ``[B]`` or per token ``[B, T]``, codes or names (see
        :func:`~evil_moe.routing.labels.parse_route_labels`), under ``semantics``.
        Without ``route`` the plan is the active ``route_labels`` context's, if any."""
        tokens = tokens.to(self.wte.weight.device)  # device-transparent (no-op on CPU)
        if route is not None:
            state = self.handle.state
            state.begin_forward(route, mode, tuple(tokens.shape), tokens.device, semantics, "route")
        return super().forward(tokens)

    def aux_losses(self) -> dict[str, Tensor]:
        """Auxiliary router losses of the last forward pass, summed over blocks."""
        return self.handle.aux_losses()

    def parameter_groups(self) -> ParameterGroups:
        """Routed shared, open shared and quarantine parameters (for a ledger or clipping)."""
        return self.handle.parameter_groups()

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts: shared (deployed), quarantine (ablated), and the quarantine
        parameters whose per-expert gradients a backward router assigns."""
        quarantine = sum(p.numel() for p in quarantine_parameters(self).values())
        total = sum(p.numel() for p in self.parameters())
        controlled = sum(
            p.numel()
            for layer in self.handle.layers.values()
            if layer.router is not None and layer.router.policy != "all"
            for p in layer.experts.quarantine_parameters().values()
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

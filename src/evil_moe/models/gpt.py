"""A plain small GPT: the testbed's base model, in one readable file (nanoGPT style).

Learned positions, pre-norm blocks (RMSNorm), fused QKV attention, a two-layer MLP and
an output head tied to the token embedding. Nothing here knows about routing: the
testbed (:mod:`evil_moe.models.testbed`) adds its quarantine with the same
:func:`~evil_moe.models.inject.inject` that serves Hugging Face models.

    model = GPT(GPTConfig(vocab_size=2048, n_layer=4))
    logits = model(tokens)                        # [B, T, vocab]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evil_moe.modules.experts import ACTIVATIONS

__all__ = ["GPT", "GPTConfig", "causal_attention"]


@dataclass
class GPTConfig:
    """Size of a plain GPT."""

    vocab_size: int = 2048
    seq_len: int = 128
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    mlp_width: int = 512
    activation: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention; ``qkv`` and ``out`` are plain linear layers (an
    adapter may add heads: :class:`~evil_moe.models.heads.QuarantineHeads`)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.n_head * cfg.head_dim)
        self.out = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        att = causal_attention(self.qkv(x).view(B, T, 3, self.n_head, self.head_dim))
        return self.out(att.reshape(B, T, self.n_head * self.head_dim))


def causal_attention(qkv: Tensor) -> Tensor:
    """Causal scaled-dot-product attention of fused ``qkv`` ``[B, T, 3, H, hd]``; returns
    the heads' outputs ``[B, T, H, hd]``."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, hd]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_width)
        self.down = nn.Linear(cfg.mlp_width, cfg.d_model)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Decoder-only language model: ``tokens [B, T] -> logits [B, T, vocab]``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, tokens: Tensor) -> Tensor:
        _B, T = tokens.shape
        if self.config.seq_len < T:
            raise ValueError(
                f"sequence length {T} exceeds the model's seq_len {self.config.seq_len}"
            )
        pos = self.wpe(torch.arange(T, device=tokens.device).unsqueeze(0))  # [1, T, d]
        x = self.wte(tokens) + pos
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))

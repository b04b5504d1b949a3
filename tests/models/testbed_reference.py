"""Helpers for the testbed tests: tiny configs, parameter sets and a slow reference forward.

The reference forward re-implements the testbed from its description with plain torch ops
(manual causal softmax attention, ``torch.where`` + ``.detach()`` instead of custom
autograd functions). It knows three per-position switches:

* ``shared_keep`` (SGTM's per-position rule): where False, every *routed* shared parameter
  is used detached, so that position writes no gradient into it while activation
  cotangents flow unchanged;
* ``q_on``: where False, the quarantine outputs (attention heads and MLP experts) are
  removed from the forward pass;
* ``detach_out`` (gradient routing, Cloud et al.): where True, the shared block outputs
  (core attention after its output projection; core MLP + shared expert) are detached.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor

from evil_moe.models.testbed import Testbed, TestbedConfig
from evil_moe.modules.ablation import quarantine_parameters
from tiny import tiny_config  # noqa: F401  (re-exported for the testbed tests)

RETAIN, FORGET, UNLABELED = 0, 1, 2
_ACT = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}
_NORM_NAME = re.compile(r"(^|\.)(norm1|norm2|norm_f)(\.base_layer)?\.weight$")
EMBEDDING_NAMES = {"wte.weight", "wpe.weight"}


def make_model(cfg: TestbedConfig, seed: int = 0, scale: float = 0.3) -> Testbed:
    """A float64 testbed whose every parameter (biases, norm gains too) is randomised.

    Randomising away from the init (zero biases, unit gains) makes every parameter's
    gradient generic, so a missing or extra gradient term cannot hide behind a zero.
    """
    torch.manual_seed(seed)
    model = Testbed(cfg).double()
    gen = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if _NORM_NAME.search(name):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(scale * noise)
    return model


def quarantine_names(model) -> set[str]:
    return set(quarantine_parameters(model))


def routed_shared_names(model) -> set[str]:
    """Shared parameters that forget tokens may not train, derived from the config."""
    cfg = model.cfg
    out = set()
    for name, _ in model.named_parameters():
        if name in quarantine_names(model):
            continue
        if not cfg.route_embeddings and name in EMBEDDING_NAMES:
            continue
        if not cfg.route_norms and _NORM_NAME.search(name):
            continue
        out.add(name)
    return out


def block_shared_names(model) -> set[str]:
    """Shared parameters that only act through a block's shared output (attn core, MLP)."""
    pat = re.compile(r"^blocks\.\d+\.(attn\.base_layer\.(qkv|out)\.|mlp\.(base_layer|shared)\.)")
    return {n for n, _ in model.named_parameters() if pat.search(n)}


def token_loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum of token cross-entropies in the logits' own dtype (float64 stays float64)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )


def grads_of(model, loss: Tensor) -> dict[str, Tensor]:
    """Gradient of ``loss`` for every parameter (zeros where unused or frozen)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    out = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for (n, _), g in zip(named, got, strict=True):
        if g is not None:
            out[n] = g.detach().clone()
    return out


def sequence_route(labels: list[int], seq_len: int) -> Tensor:
    """Per-sequence labels broadcast to ``[B, T]``."""
    return torch.tensor(labels, dtype=torch.long).view(-1, 1).expand(-1, seq_len).contiguous()


# -- reference forward ---------------------------------------------------------------------
def _where_rows(flags: Tensor | None, a: Tensor, b) -> Tensor:
    if flags is None:
        return a
    b = b if isinstance(b, Tensor) else torch.zeros_like(a)
    return torch.where(flags.unsqueeze(-1), a, b)


def _param(p: Tensor, keep: Tensor | None, fn):
    """``fn(p)`` live where ``keep``, ``fn(p.detach())`` elsewhere."""
    live = fn(p)
    if keep is None:
        return live
    return torch.where(keep.unsqueeze(-1), live, fn(p.detach()))


def _linear(x, w, b, keep):
    def f(wb):
        return x @ wb[0].t() + (wb[1] if wb[1] is not None else 0)

    live = f((w, b))
    if keep is None:
        return live
    frozen = f((w.detach(), b.detach() if b is not None else None))
    return torch.where(keep.unsqueeze(-1), live, frozen)


def _norm(x, w, keep):
    xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return _param(w, keep, lambda ww: xhat * ww)


def reference_forward(
    model: Testbed,
    tokens: Tensor,
    shared_keep: Tensor | None = None,
    q_on: Tensor | None = None,
    detach_out: Tensor | None = None,
) -> Tensor:
    cfg = model.cfg
    B, T = tokens.shape
    act = _ACT[cfg.activation]
    emb_keep = shared_keep if cfg.route_embeddings else None
    norm_keep = shared_keep if cfg.route_norms else None
    H, Hq, hd = cfg.n_head, cfg.n_quarantine_heads, cfg.d_model // cfg.n_head

    x = _param(model.wte.weight, emb_keep, lambda w: w[tokens])
    x = x + _param(model.wpe.weight, emb_keep, lambda w: w[:T].expand(B, T, -1))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for blk in model.blocks:
        a = blk.attn
        h = _norm(x, blk.norm1.weight, norm_keep)
        qkv = _linear(h, a.qkv.weight, a.qkv.bias, shared_keep).view(B, T, 3, H, hd)
        if Hq:
            qq = (h @ a.q_qkv.t() + a.q_qkv_bias).view(B, T, 3, Hq, hd)
            qkv = torch.cat([qkv, qq], dim=3)
        q, k, v = qkv.unbind(2)  # [B, T, H+Hq, hd]
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        att = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
        y = _linear(att[:, :, :H].reshape(B, T, H * hd), a.out.weight, a.out.bias, shared_keep)
        if detach_out is not None:
            y = torch.where(detach_out.unsqueeze(-1), y.detach(), y)
        if Hq:
            yq = att[:, :, H:].reshape(B, T, Hq * hd) @ a.q_out.t()
            y = y + _where_rows(q_on, yq, 0)
        x = x + y

        bank = blk.mlp
        # the reference covers the default bank: no backward router, no forward soft gate
        assert bank.router is None and getattr(bank, "gate", None) is None
        h = _norm(x, blk.norm2.weight, norm_keep)
        core = bank.base_layer
        s = _linear(
            act(_linear(h, core.up.weight, core.up.bias, shared_keep)),
            core.down.weight,
            core.down.bias,
            shared_keep,
        )
        if bank.shared is not None:
            se = bank.shared
            s = s + _linear(
                act(_linear(h, se.up.weight, se.up.bias, shared_keep)),
                se.down.weight,
                se.down.bias,
                shared_keep,
            )
        if detach_out is not None:
            s = torch.where(detach_out.unsqueeze(-1), s.detach(), s)
        ex = bank.experts
        yq = act(h @ ex.up.t() + ex.up_bias) @ ex.down.t()
        x = x + s + _where_rows(q_on, yq, 0)
    x = _norm(x, model.norm_f.weight, norm_keep)
    return _param(model.wte.weight, emb_keep, lambda w: x @ w.t())

"""Backward routers: which quarantine expert(s) receive each routed token's gradient.

The decision is made in the backward pass from the gradient itself; the forward output
never depends on it (every expert is present for every token). So expert-choice routing
cannot peek at future tokens at inference: inference is untouched.

**Backward alignment** (the default, ``alignment="output"``). With ``g_t`` the gradient of
the loss with respect to the bank's output at token ``t`` and ``y_{t,k}`` expert ``k``'s
output there, ``-<g_t, y_{t,k}>`` is the first-order decrease of the loss if expert ``k``'s
output were scaled up by a small factor: how much the token *wants* that expert. We
normalise by ``|g_t| * |y_t|`` (``y_t`` the summed quarantine output), so that the K
scores of a token add up to ``cos(-g_t, y_t)`` and tokens with large gradients do not
dominate expert-choice or balanced assignment. It costs one elementwise product and a
segment sum, since ``<g_t, y_{t,k}> = sum_{j in k} (g_t D)_j h_{t,j}`` and ``g D`` is
computed by the backward pass anyway.

The alternative, ``alignment="prototype"``, scores ``cos(-g_t, p_k)`` against an EMA
prototype ``p_k`` of the (negated, normalised) gradients expert ``k`` already took. It
rewards consistency with an expert's history rather than usefulness of its current
features; it needs no expert outputs, but it starts from random prototypes and can lock
in early accidents. We keep ``output`` as the default because it measures exactly what
absorption is about: which expert's present features already reduce this token's loss.

Policies, all acting on routed tokens inside the quarantine bank only:

* ``all``: every expert (K = 1 is a single quarantine block).
* ``topk``: the ``top_k`` best-aligned experts per token.
* ``expert_choice``: each expert takes its ``capacity`` best-aligned tokens of the batch,
  ``capacity = ceil(capacity_factor * n_routed * top_k / K)``; a token may get several
  experts or none (``dropped``).
* ``balanced``: Sinkhorn optimal transport with uniform marginals (tokens ``1/n``,
  experts ``1/K``) on ``exp(score / temperature)``, then each token takes its
  highest-mass expert (BASE-style balanced assignment).

Two controls for specialisation studies, which ignore the gradient:

* ``random``: each routed token gets ``top_k`` experts drawn uniformly (seeded): the
  negative control, which must not specialise by forget mode.
* ``oracle``: forget mode ``m`` (1-based, as in the hack corpus) goes to expert
  ``(m - 1) mod K``: the positive control (tokens without a mode take every expert).

**Correcting harmful experts** (``correct_harmful``, on by default). Every expert is
present in every token's forward pass, so an expert that a token's gradient would push
down (negative score: it currently *raises* that token's loss) but that the policy did not
pick would never be corrected by the token; the picked experts then grow against it and
expert outputs cancel each other at large norms (a sum of norms many times the norm of
the sum). With ``correct_harmful`` an expert also takes a routed token's gradient when
its score is negative, so assignment decides only which *helpful* experts learn from a
token. Loads count the policy's assignment only.

Auxiliary-loss-free balancing (DeepSeek-V3): with ``bias_rate > 0`` a per-expert bias is
added to the scores for selection only and nudged after each step by
``bias_rate * sign(mean_load - load_k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

POLICIES = ("all", "topk", "expert_choice", "balanced", "random", "oracle")
ALIGNMENTS = ("output", "prototype")


def sinkhorn(
    scores: Tensor,
    temperature: float = 0.1,
    iters: int = 100,
    tol: float = 1e-4,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, int]:
    """Transport plan ``[n, K]`` with rows summing to ``1/n`` and columns to ``1/K``.

    Computed in log space for stability, in ``dtype`` (float64 by default; float32 may
    flip the argmax of near-tied rows, and on a CPU it is slower, see
    ``bench/routers.py``). Each iteration normalises rows then columns and stops when
    the largest row-marginal error (relative to ``1/n``) is below ``tol``, after at most
    ``iters`` iterations: the worst case is ``iters`` x (two ``logsumexp`` over
    ``[n, K]``), reached on sharp scores (``bench/routers.py`` measures it). Returns the
    plan and the iterations used.
    """
    n, k = scores.shape
    log_p = scores.to(dtype) / temperature
    log_r, log_c = -math.log(n), -math.log(k)
    used = 0
    row_lse = torch.logsumexp(log_p, dim=1, keepdim=True)
    for used in range(1, iters + 1):  # noqa: B007 - the count is returned
        log_p = log_p - row_lse + log_r
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + log_c
        # the row sums of the new plan: its error now, and the next row normalisation
        row_lse = torch.logsumexp(log_p, dim=1, keepdim=True)
        row_err = (row_lse - log_r).exp().sub(1).abs().max()
        if float(row_err) < tol:
            break
    return log_p.exp().to(scores.dtype), used


class BackwardRouter(nn.Module):
    """Assigns routed tokens' quarantine gradients to experts, from the gradient.

    Holds its own statistics (load per expert, mode x expert counts) for the
    specialisation metrics; :meth:`reset_stats` clears them.
    """

    def __init__(
        self,
        n_experts: int,
        policy: str = "all",
        top_k: int = 1,
        capacity_factor: float = 1.0,
        alignment: str = "output",
        temperature: float = 0.1,
        sinkhorn_iters: int = 100,
        sinkhorn_tol: float = 1e-3,
        bias_rate: float = 0.0,
        amplify_threshold: float | None = None,
        d_model: int = 0,
        prototype_decay: float = 0.9,
        n_modes: int = 8,
        seed: int = 0,
        correct_harmful: bool = True,
    ):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"unknown router policy {policy!r}; choose from {POLICIES}")
        if alignment not in ALIGNMENTS:
            raise ValueError(f"unknown alignment {alignment!r}; choose from {ALIGNMENTS}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be in [1, n_experts={n_experts}]")
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        if alignment == "prototype" and d_model <= 0:
            raise ValueError("alignment='prototype' needs d_model")
        self.n_experts = n_experts
        self.policy = policy
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.alignment = alignment
        self.temperature = temperature
        self.sinkhorn_iters = sinkhorn_iters
        self.sinkhorn_tol = sinkhorn_tol
        self.bias_rate = bias_rate
        self.amplify_threshold = amplify_threshold
        self.prototype_decay = prototype_decay
        self.n_modes = n_modes
        self.correct_harmful = correct_harmful
        self.seed = seed
        self.register_buffer("bias", torch.zeros(n_experts))
        #: calls of the ``random`` policy so far: its draws resume exactly from a checkpoint
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        if alignment == "prototype":
            g = torch.Generator().manual_seed(seed)
            proto = torch.randn(n_experts, d_model, generator=g)
            self.register_buffer("prototypes", proto / proto.norm(dim=1, keepdim=True))
        self.register_buffer("load", torch.zeros(n_experts), persistent=False)
        self.register_buffer("mode_load", torch.zeros(n_modes, n_experts), persistent=False)
        self.register_buffer("routed_tokens", torch.zeros(()), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros(()), persistent=False)
        self.register_buffer("amplified_tokens", torch.zeros(()), persistent=False)
        self.register_buffer("entropy_sum", torch.zeros(()), persistent=False)
        self.register_buffer("corrected_pairs", torch.zeros(()), persistent=False)

    # -- scores ----------------------------------------------------------------------
    def scores(self, contrib: Tensor, grad: Tensor, out_norm: Tensor) -> Tensor:
        """Alignment ``[N, K]`` from ``contrib[t, k] = <g_t, y_{t,k}>``."""
        gnorm = grad.norm(dim=1, keepdim=True)
        if self.alignment == "output":
            return -contrib / (gnorm * out_norm.unsqueeze(1) + 1e-12)
        direction = -grad / (gnorm + 1e-12)
        return direction @ self.prototypes.to(grad.dtype).t()

    # -- assignment ------------------------------------------------------------------
    def assign(self, scores: Tensor, mode: Tensor | None = None) -> Tensor:
        """0/1 keep matrix ``[n, K]`` for ``n`` routed tokens (``mode`` for ``oracle``)."""
        n, k = scores.shape
        if self.policy == "all" or n == 0:
            return torch.ones_like(scores)
        if self.policy == "oracle":
            return self._oracle(scores, mode)
        keep = torch.zeros_like(scores)
        if self.policy == "random":
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.draws))
            self.draws += 1
            draws = torch.rand(n, k, generator=gen).argsort(dim=1)[:, : self.top_k]
            return keep.scatter_(1, draws.to(scores.device), 1.0)
        biased = scores + self.bias.to(scores.dtype)
        if self.policy == "topk":
            keep.scatter_(1, biased.topk(self.top_k, dim=1).indices, 1.0)
        elif self.policy == "expert_choice":
            capacity = min(n, math.ceil(self.capacity_factor * n * self.top_k / k))
            affinity = torch.softmax(biased / self.temperature, dim=1)
            keep.scatter_(0, affinity.topk(capacity, dim=0).indices, 1.0)
        else:  # balanced
            plan, _ = sinkhorn(biased, self.temperature, self.sinkhorn_iters, self.sinkhorn_tol)
            keep.scatter_(1, plan.argmax(dim=1, keepdim=True), 1.0)
        return keep

    def _oracle(self, scores: Tensor, mode: Tensor | None) -> Tensor:
        """Forget mode ``m >= 1`` -> expert ``(m - 1) mod K``; no mode -> every expert."""
        keep = torch.ones_like(scores)
        if mode is None:
            return keep
        mode = mode.to(scores.device).long()
        known = mode >= 1
        rows = known.nonzero().squeeze(1)
        keep[rows] = 0.0
        keep[rows, (mode[rows] - 1) % scores.shape[1]] = 1.0
        return keep

    @torch.no_grad()
    def decide(
        self, contrib: Tensor, grad: Tensor, out_norm: Tensor, routed: Tensor, mode: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Per-token expert keep ``[N, K]`` (``None`` = all ones) and amplified tokens.

        ``routed`` marks labelled forget tokens. With ``amplify_threshold`` set, unlabeled
        tokens (``routed`` False, gradient nonzero) whose summed alignment exceeds it are
        routed too and returned as ``amplified`` (bool ``[N]``).
        """
        scores = self.scores(contrib, grad, out_norm)
        amplified = None
        if self.amplify_threshold is not None:
            live = grad.abs().sum(dim=1) > 0
            amplified = (~routed) & live & (scores.sum(dim=1) > self.amplify_threshold)
            routed = routed | amplified
            self.amplified_tokens += amplified.sum()
        idx = routed.nonzero().squeeze(1)
        if idx.numel() == 0:
            return None, amplified
        routed_scores = scores[idx]
        routed_mode = None if mode is None else mode[idx]
        chosen = self.assign(routed_scores, routed_mode)
        # the routed rows of the gradient (a copy of [n, d]) only for prototype alignment
        routed_grad = grad[idx] if self.alignment == "prototype" else None
        self._record(chosen, routed_scores, routed_grad, routed_mode)
        keep = torch.ones_like(contrib)
        if self.correct_harmful and self.policy != "all":
            harmful = (routed_scores < 0).to(chosen.dtype)
            self.corrected_pairs += (harmful * (1 - chosen)).sum()
            keep[idx] = torch.maximum(chosen, harmful)
        else:
            keep[idx] = chosen
        return keep, amplified

    def _record(
        self, chosen: Tensor, scores: Tensor, grad: Tensor | None, mode: Tensor | None
    ) -> None:
        """Update the load statistics (and, for prototype alignment, the prototypes from
        the routed rows ``grad``)."""
        load = chosen.sum(dim=0).to(self.load.dtype)
        self.load += load
        self.routed_tokens += chosen.shape[0]
        self.dropped_tokens += (chosen.sum(dim=1) == 0).sum()
        probs = torch.softmax(scores / self.temperature, dim=1)
        self.entropy_sum += -(probs * probs.clamp_min(1e-12).log()).sum()
        if mode is not None:
            valid = (mode >= 0) & (mode < self.n_modes)
            self.mode_load.index_add_(0, mode[valid], chosen[valid].to(self.mode_load.dtype))
        if self.bias_rate > 0 and self.policy != "all":
            self.bias += self.bias_rate * torch.sign(load.mean() - load)
        if self.alignment == "prototype" and grad is not None:
            direction = -grad / (grad.norm(dim=1, keepdim=True) + 1e-12)
            counts = chosen.sum(dim=0, keepdim=True).t()
            mean = (chosen.t() @ direction) / counts.clamp_min(1)
            update = counts > 0
            d = self.prototype_decay
            proto = torch.where(update, d * self.prototypes + (1 - d) * mean, self.prototypes)
            self.prototypes.copy_(proto / proto.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def reset_stats(self) -> None:
        for name in ("load", "mode_load", "routed_tokens", "dropped_tokens"):
            getattr(self, name).zero_()
        self.amplified_tokens.zero_()
        self.entropy_sum.zero_()
        self.corrected_pairs.zero_()


@dataclass
class RouterConfig:
    """Backward-router settings of a quarantine bank (see the module docstring)."""

    #: ``all``, ``topk``, ``expert_choice`` or ``balanced``
    policy: str = "all"
    top_k: int = 1
    capacity_factor: float = 1.0
    #: ``output`` (first-order loss decrease) or ``prototype`` (EMA gradient prototypes)
    alignment: str = "output"
    temperature: float = 0.1
    sinkhorn_iters: int = 100
    sinkhorn_tol: float = 1e-3
    #: auxiliary-loss-free balancing step (DeepSeek-V3); 0 = off
    bias_rate: float = 0.0
    #: also route unlabeled tokens whose alignment with the quarantine exceeds the threshold
    amplify: bool = False
    amplify_threshold: float = 0.5
    #: an expert whose output raises a routed token's loss always takes its gradient
    correct_harmful: bool = True

    def __post_init__(self) -> None:
        checks = {
            "policy": self.policy in POLICIES,
            "alignment": self.alignment in ALIGNMENTS,
            "top_k": self.top_k >= 1,
            "capacity_factor": self.capacity_factor > 0,
            "temperature": self.temperature > 0,
            "sinkhorn_iters": self.sinkhorn_iters >= 1,
            "sinkhorn_tol": self.sinkhorn_tol > 0,
            "bias_rate": self.bias_rate >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid router config value for {', '.join(bad)}")

    def build(self, n_experts: int, d_model: int, seed: int = 0) -> BackwardRouter | None:
        """A router for one bank, or ``None`` when every expert takes every gradient."""
        if self.policy == "all" and not self.amplify:
            return None
        if self.top_k > n_experts:
            raise ValueError(f"router top_k={self.top_k} exceeds n_experts={n_experts}")
        return BackwardRouter(
            n_experts,
            policy=self.policy,
            top_k=self.top_k,
            capacity_factor=self.capacity_factor,
            alignment=self.alignment,
            temperature=self.temperature,
            sinkhorn_iters=self.sinkhorn_iters,
            sinkhorn_tol=self.sinkhorn_tol,
            bias_rate=self.bias_rate,
            amplify_threshold=self.amplify_threshold if self.amplify else None,
            d_model=d_model,
            seed=seed,
            correct_harmful=self.correct_harmful,
        )

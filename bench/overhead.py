"""Step-time overhead of exact per-token SGTM routing over dense training of the same model.

Both models are the default testbed with K experts (same init); one trains with semantics
"none" (dense), the other with "sgtm" on a batch that mixes retain, forget and unlabeled
sequences. Steps are interleaved (dense, routed, dense, ...) so that machine noise hits
both alike; we report medians. Also tokens/s and model-FLOPs utilisation against a
float32 matmul peak measured in the same run.

    python bench/overhead.py [--steps 30] [--experts 4] [--router all]

Last line: ``sgtm_over_dense_step_time=VALUE``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from evil_moe.models.testbed import Testbed, TestbedConfig, lm_loss
from evil_moe.modules.ablation import parameter_groups
from evil_moe.routing.optim import StepLedger, routed_step
from evil_moe.routing.routers import RouterConfig
from evil_moe.train.memory import keep_heap


def matmul_peak(n: int = 1024, repeats: int = 20) -> float:
    """Float32 matmul FLOP/s on this machine (best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def model_flops_per_token(cfg: TestbedConfig, params: int) -> float:
    """6 * parameters (embeddings excluded, tied head included) + attention scores."""
    matmul_params = params - cfg.vocab_size * cfg.d_model - cfg.seq_len * cfg.d_model
    matmul_params += cfg.vocab_size * cfg.d_model  # the tied output projection
    heads = cfg.n_head + cfg.n_quarantine_heads
    attention = 6 * cfg.n_layer * cfg.seq_len * heads * cfg.head_dim  # QK^T and AV, fwd+bwd
    return 6 * matmul_params + attention


def make_step(model: Testbed, semantics: str):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    ledger = StepLedger(parameter_groups(model), semantics)

    def step(tokens: torch.Tensor, route: torch.Tensor) -> float:
        t = time.perf_counter()
        logits = model(tokens[:, :-1], route=route, semantics=semantics)
        lm_loss(logits, tokens[:, 1:]).backward()
        ledger.record(route)
        routed_step(opt, ledger, max_norm=1.0)
        return time.perf_counter() - t

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--router", default="all", help="backward router policy")
    parser.add_argument("--routed-semantics", default="sgtm")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    keep_heap()  # as in a study worker: freed step buffers stay in the heap
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = TestbedConfig(n_experts=args.experts, router=RouterConfig(policy=args.router))
    routed_model = Testbed(cfg)
    dense_model = copy.deepcopy(routed_model)
    B, T = args.batch_size, cfg.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1))
    labels = torch.tensor([0, 1, 2, 2])[torch.arange(B) % 4]  # retain, forget, unlabeled x2
    route = labels[:, None].expand(B, T).contiguous()
    dense = make_step(dense_model, "none")
    routed = make_step(routed_model, args.routed_semantics)
    times: dict[str, list[float]] = {"dense": [], "routed": []}
    for i in range(args.warmup + args.steps):
        d = dense(tokens, route)
        r = routed(tokens, route)
        if i >= args.warmup:
            times["dense"].append(d)
            times["routed"].append(r)
    dense_s = statistics.median(times["dense"])
    routed_s = statistics.median(times["routed"])
    peak = matmul_peak()
    params = sum(p.numel() for p in routed_model.parameters())
    flops = model_flops_per_token(cfg, params) * B * T
    print(
        f"threads={torch.get_num_threads()} batch={B}x{T} experts={args.experts} router={args.router}"
    )
    print(f"dense_step_s={dense_s:.4f}")
    print(f"routed_step_s={routed_s:.4f}")
    print(f"dense_tokens_per_s={B * T / dense_s:.0f}")
    print(f"routed_tokens_per_s={B * T / routed_s:.0f}")
    print(f"matmul_peak_gflops={peak / 1e9:.1f}")
    print(f"dense_mfu={flops / dense_s / peak:.3f}")
    print(f"routed_mfu={flops / routed_s / peak:.3f}")
    print(f"sgtm_over_dense_step_time={routed_s / dense_s:.3f}")


if __name__ == "__main__":
    main()

"""Step-time cost of the backward routers over routing to every expert (policy ``all``).

Four copies of the default testbed with K experts and the same init differ only in the
router policy: ``all`` (every quarantine expert takes every routed gradient, no router),
``topk``, ``expert_choice`` and ``balanced``. One training step is forward + backward +
AdamW step on a batch that mixes retain, forget (about a quarter, with forget modes) and
unlabeled sequences under SGTM. Steps are interleaved in one process (the order rotates
every round) so that machine noise hits all policies alike; we report medians.

After the timed rounds, a few untimed steps per policy measure the time spent inside
``BackwardRouter.decide`` (and, for ``balanced``, the Sinkhorn iterations used), so the
report says where a router's overhead goes. Last, the worst case of one Sinkhorn call
(sharp scores, the iteration cap reached) for a quarter and for all of the batch's tokens,
in float64 (what the router uses) and float32.

    python bench/routers.py [--steps 20] [--warmup 3] [--experts 8] [--threads 0]

On an oversubscribed machine (load above the core count) use ``--threads 1``: a router
adds a dozen tiny ops per layer, and with several OpenMP threads each of them can stall
for a scheduler time slice waiting for a descheduled worker, which inflates the routers'
share far beyond their compute.

Last line: ``router_max_over_all=VALUE`` (the worst policy's step-time ratio).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from evil_moe.models.testbed import Testbed, TestbedConfig, lm_loss
from evil_moe.routing import routers as routers_module
from evil_moe.routing.routers import BackwardRouter, RouterConfig
from evil_moe.train.memory import keep_heap

POLICIES = ("all", "topk", "expert_choice", "balanced")
TARGETS = {"topk": 1.05, "expert_choice": 1.05, "balanced": 1.15}


def build_models(n_experts: int, quarantine_width: int) -> dict[str, Testbed]:
    """One model per policy, all with the parameters of the ``all`` model."""
    torch.manual_seed(0)
    base = Testbed(TestbedConfig(n_experts=n_experts, quarantine_width=quarantine_width))
    models = {"all": base}
    for policy in POLICIES[1:]:
        cfg = TestbedConfig(
            n_experts=n_experts,
            quarantine_width=quarantine_width,
            router=RouterConfig(policy=policy),
        )
        model = Testbed(cfg)
        model.load_state_dict(base.state_dict(), strict=False)
        models[policy] = model
    return models


def make_batch(cfg: TestbedConfig, batch_size: int, seed: int = 0):
    """Tokens ``[B, T+1]``, route and mode ``[B, T]``: 1/4 retain, 1/4 forget, 1/2 unlabeled."""
    gen = torch.Generator().manual_seed(seed)
    B, T = batch_size, cfg.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=gen)
    labels = torch.tensor([0, 1, 2, 2])[torch.arange(B) % 4]
    route = labels[:, None].expand(B, T).contiguous()
    seq_mode = torch.arange(B) % 3  # three forget modes
    mode = torch.where(route == 1, seq_mode[:, None].expand(B, T), -1).contiguous()
    return tokens, route, mode


def make_step(model: Testbed) -> Callable[..., float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    def step(tokens: torch.Tensor, route: torch.Tensor, mode: torch.Tensor) -> float:
        t = time.perf_counter()
        logits = model(tokens[:, :-1], route=route, mode=mode, semantics="sgtm")
        lm_loss(logits, tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    return step


def decide_breakdown(model: Testbed, step, batch, steps: int) -> dict[str, float]:
    """Seconds per step inside ``decide`` (and Sinkhorn iterations), measured with wrappers."""
    found = [m for m in model.modules() if isinstance(m, BackwardRouter)]
    spent = {"decide_s": 0.0, "assign_s": 0.0, "sinkhorn_iters": 0.0, "routed_rows": 0.0}
    original_sinkhorn = routers_module.sinkhorn

    def timed_sinkhorn(*args, **kwargs):
        plan, used = original_sinkhorn(*args, **kwargs)
        spent["sinkhorn_iters"] += used
        return plan, used

    def wrap(router: BackwardRouter, name: str, key: str):
        inner = getattr(router, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            spent[key] += time.perf_counter() - t
            if name == "assign":
                spent["routed_rows"] += args[0].shape[0]
            return out

        setattr(router, name, wrapper)

    for router in found:
        wrap(router, "decide", "decide_s")
        wrap(router, "assign", "assign_s")
    routers_module.sinkhorn = timed_sinkhorn
    try:
        for _ in range(steps):
            step(*batch)
    finally:
        routers_module.sinkhorn = original_sinkhorn
        for router in found:
            del router.decide, router.assign  # back to the class methods
    calls = max(1, steps * len(found))
    return {
        "decide_ms_per_step": 1e3 * spent["decide_s"] / steps,
        "assign_ms_per_step": 1e3 * spent["assign_s"] / steps,
        "sinkhorn_iters_per_call": spent["sinkhorn_iters"] / calls,
        "routed_rows_per_call": spent["routed_rows"] / calls,
    }


def sinkhorn_worst_case(
    rows: int, experts: int, dtype: torch.dtype, repeats: int = 5
) -> tuple[float, int]:
    """Milliseconds (median) and iterations of one Sinkhorn call on sharp scores.

    Scores of a batch where nearly every token prefers the same expert, at the router's
    default temperature and tolerance: the iterations never reach the tolerance, so this
    is the capped worst case (``sinkhorn_iters`` iterations).
    """
    gen = torch.Generator().manual_seed(0)
    scores = 5 * torch.randn(rows, experts, generator=gen)
    scores[:, 0] += 10
    cfg = RouterConfig(policy="balanced")
    times, used = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        _, used = routers_module.sinkhorn(
            scores, cfg.temperature, cfg.sinkhorn_iters, cfg.sinkhorn_tol, dtype=dtype
        )
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times), used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--quarantine-width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--breakdown-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    keep_heap()  # as in a study worker: freed step buffers stay in the heap
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build_models(args.experts, args.quarantine_width)
    cfg = models["all"].cfg
    batch = make_batch(cfg, args.batch_size)
    steps = {name: make_step(model) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in POLICIES}
    order = list(POLICIES)
    for i in range(args.warmup + args.steps):
        for name in order:
            elapsed = steps[name](*batch)
            if i >= args.warmup:
                times[name].append(elapsed)
        order = order[1:] + order[:1]
    median = {name: statistics.median(values) for name, values in times.items()}
    B, T = batch[1].shape
    print(
        f"threads={torch.get_num_threads()} batch={B}x{T} experts={args.experts} "
        f"steps={args.steps} forget_share={float((batch[1] == 1).float().mean()):.2f}"
    )
    for name in POLICIES:
        spread = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else [0, 0, 0]
        print(f"{name}_step_s={median[name]:.4f} (iqr {spread[0]:.4f}..{spread[2]:.4f})")
    for name in POLICIES[1:]:
        info = decide_breakdown(models[name], steps[name], batch, args.breakdown_steps)
        details = " ".join(f"{k}={v:.2f}" for k, v in info.items())
        print(f"{name}_breakdown: {details}")
    for rows in (B * T // 4, B * T):  # a quarter of the batch routed (as here), all of it
        for dtype in (torch.float64, torch.float32):
            ms, used = sinkhorn_worst_case(rows, args.experts, dtype)
            name = str(dtype).removeprefix("torch.")
            print(f"sinkhorn_worst_ms[{rows}x{args.experts},{name}]={ms:.2f} (iters={used})")
    ratios = {name: median[name] / median["all"] for name in POLICIES[1:]}
    for name, ratio in ratios.items():
        verdict = "ok" if ratio <= TARGETS[name] else f"ABOVE target {TARGETS[name]}"
        print(f"{name}_over_all={ratio:.3f}  # {verdict}")
    print(f"router_max_over_all={max(ratios.values()):.3f}")


if __name__ == "__main__":
    main()

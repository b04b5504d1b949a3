"""Tokens/s and MFU on one GPU: the testbed at ~8M and ~64M parameters and a Hugging Face
Llama with LoRA quarantine experts, each routed over unrouted.

Routed: SGTM with K=4 quarantine experts and the top-1 backward router (the study's
``fine4``) on batches that mix retain, forget and unlabeled sequences. Unrouted: the
same model (same parameters) trained with semantics ``none`` (testbed) or without route
labels (Hugging Face). Steps (forward + backward + AdamW) run under bf16 autocast, as
training does on a GPU, and alternate routed / unrouted so that clock changes hit both
alike; we report medians. MFU is model FLOPs per second (6 x trained parameters, 4 x
frozen ones, plus attention) over the device's dense bf16 peak: its datasheet value when
the device is in :data:`BF16_PEAK_TFLOPS`, else a bf16 matmul measured in the same run
(which is printed either way).

    python bench/gpu.py [--steps 20] [--warmup 5] [--batch-size 32] [--no-hf]

Without a GPU it says so, prints ``gpu_routed_over_unrouted_max=skipped`` and exits 0
(``--device cpu --smoke``: tiny models on the CPU, to check the code path, not a
measurement). Last line: ``gpu_routed_over_unrouted_max=VALUE`` (the worst step-time
ratio of the three models).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from evil_moe.models.testbed import Testbed, TestbedConfig, lm_loss
from evil_moe.routing.optim import StepLedger, routed_step
from evil_moe.routing.routers import RouterConfig
from evil_moe.train.memory import keep_heap

HEADLINE = "gpu_routed_over_unrouted_max"

#: dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by a substring of the device name
BF16_PEAK_TFLOPS = {
    "B200": 2250.0,
    "GH200": 989.0,
    "H200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 125.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}

#: testbed sizes of the gpu study preset (``study/presets/gpu.toml``)
TESTBEDS = {
    "testbed_8m": {"d_model": 256, "n_layer": 10, "n_head": 4, "mlp_width": 1024},
    "testbed_64m": {"d_model": 640, "n_layer": 12, "n_head": 10, "mlp_width": 2560},
}
SMOKE_TESTBED = {"d_model": 32, "n_layer": 1, "n_head": 2, "mlp_width": 64}


@dataclass
class Result:
    """Median step times of one model, routed and unrouted, and its FLOPs per token."""

    name: str
    params: int
    tokens_per_step: int
    flops_per_token: float
    routed_s: float
    unrouted_s: float


def datasheet_peak(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak in FLOP/s (``None``: not in the table)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for key, tflops in BF16_PEAK_TFLOPS.items():  # a longer name before its prefix
        if key in name:
            return name, tflops * 1e12
    return name, None


def matmul_peak(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """bf16 matmul FLOP/s measured here (best of ``repeats``; fp32 on a CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on a GPU (as ``train.devices`` does), nothing on a CPU."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def mixed_route(batch: int, device: torch.device) -> Tensor:
    """Per-sequence labels: a quarter retain, a quarter forget, half unlabeled."""
    return torch.tensor([0, 1, 2, 2], device=device)[torch.arange(batch, device=device) % 4]


def time_pair(
    steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, timed: int
) -> dict[str, float]:
    """Median seconds per step of each named step, run alternately."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    for i in range(warmup + timed):
        for name in order if i % 2 == 0 else reversed(order):
            sync(device)
            t = time.perf_counter()
            steps[name]()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def bench_testbed(
    name: str, sizes: dict[str, int], device: torch.device, args: argparse.Namespace
) -> Result:
    """The testbed with K=4 quarantine experts: SGTM + top-1 router over semantics none."""
    cfg = TestbedConfig(
        **sizes,
        seq_len=args.seq_len,
        n_quarantine_heads=1,
        quarantine_width=sizes["d_model"] // 2,
        n_experts=4,
        router=RouterConfig(policy="topk"),
    )
    torch.manual_seed(0)
    models = {"routed": Testbed(cfg).to(device), "unrouted": Testbed(cfg).to(device)}
    models["unrouted"].load_state_dict(models["routed"].state_dict())
    b, t = args.batch_size, cfg.seq_len
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (b, t + 1), generator=gen).to(device)
    route = mixed_route(b, device)[:, None].expand(b, t).contiguous()

    def make(model: Testbed, semantics: str) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ledger = StepLedger(model.parameter_groups(), semantics)

        def step() -> None:
            with autocast(device):
                logits = model(tokens[:, :-1], route=route, semantics=semantics)
            lm_loss(logits, tokens[:, 1:]).backward()
            ledger.record(route)
            routed_step(opt, ledger, 1.0)

        return step

    med = time_pair(
        {"routed": make(models["routed"], "sgtm"), "unrouted": make(models["unrouted"], "none")},
        device,
        args.warmup,
        args.steps,
    )
    params = sum(p.numel() for p in models["routed"].parameters())
    matmul = params - cfg.seq_len * cfg.d_model  # positions are a lookup; the tied head is not
    heads = cfg.n_head + cfg.n_quarantine_heads
    flops = 6 * matmul + 12 * cfg.n_layer * t * heads * cfg.head_dim
    return Result(name, params, b * t, flops, med["routed"], med["unrouted"])


def bench_hf(device: torch.device, args: argparse.Namespace) -> Result:
    """A Llama (frozen base) with K=4 LoRA quarantine experts on every linear layer:
    routed (route labels, SGTM, top-1 router) over the same model without route labels."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evil_moe.models.hf import inject

    hidden, layers, vocab = (64, 1, 256) if args.smoke else (1024, 8, 32000)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=args.hf_seq_len,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    inject(model, n_quarantine=4, rank=8, router="topk")
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    b, t = args.hf_batch_size, args.hf_seq_len
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, t), generator=gen).to(device)
    route = mixed_route(b, device)

    def make(routed: bool) -> Callable[[], None]:
        def step() -> None:
            kwargs = {"route_labels": route} if routed else {}
            with autocast(device):
                loss = model(input_ids=ids, labels=ids, **kwargs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    med = time_pair(
        {"routed": make(True), "unrouted": make(False)}, device, args.warmup, args.steps
    )
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen -= vocab * hidden  # the input embedding is a lookup (the output head is not tied)
    flops = 6 * trained + 4 * frozen + 12 * layers * t * hidden
    return Result("hf_llama_lora", trained + frozen, b * t, flops, med["routed"], med["unrouted"])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu with --smoke")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--hf-seq-len", type=int, default=512)
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face model")
    p.add_argument("--smoke", action="store_true", help="tiny models: check the code path")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    keep_heap()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: no GPU visible to torch (torch.cuda.is_available() is False);")
        print("skipped: run it on a machine with a CUDA GPU to measure tokens/s and MFU.")
        print(f"{HEADLINE}=skipped")
        return 0
    if args.device == "cpu" and not args.smoke:
        print("bench/gpu.py: --device cpu only with --smoke (the CPU benches are overhead.py,")
        print("routers.py and hf_overhead.py)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.smoke:
        args.steps, args.warmup, args.seq_len, args.hf_seq_len = 2, 1, 16, 16
        args.batch_size = args.hf_batch_size = 4
    name, peak = datasheet_peak(device)
    measured = matmul_peak(device)
    print(
        f"device={name} bf16_peak_tflops={peak / 1e12 if peak else float('nan'):.0f} "
        f"(datasheet{'' if peak else ': unknown, MFU against the measured matmul'}) "
        f"matmul_bf16_tflops={measured / 1e12:.1f}"
    )
    peak = peak or measured
    results = [
        bench_testbed(n, SMOKE_TESTBED if args.smoke else s, device, args)
        for n, s in (TESTBEDS.items() if not args.smoke else list(TESTBEDS.items())[:1])
    ]
    if args.no_hf:
        print("hf: skipped (--no-hf)")
    elif importlib.util.find_spec("transformers") is None:
        print("hf: skipped (transformers is not installed)")
    else:
        results.append(bench_hf(device, args))
    for r in results:
        for variant, seconds in (("routed", r.routed_s), ("unrouted", r.unrouted_s)):
            tps = r.tokens_per_step / seconds
            mfu = r.flops_per_token * tps / peak
            print(
                f"{r.name} params={r.params / 1e6:.1f}M {variant}: "
                f"tokens_per_s={tps:,.0f} mfu={mfu:.3f} step_ms={seconds * 1e3:.1f}"
            )
        print(f"{r.name}_routed_over_unrouted={r.routed_s / r.unrouted_s:.3f}")
    print(f"{HEADLINE}={max(r.routed_s / r.unrouted_s for r in results):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

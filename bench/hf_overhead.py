"""Step-time overhead of a routed quarantine bank on a Hugging Face model.

Routed: K=4 LoRA quarantine experts of rank r on every linear layer of a small Llama,
routed by SGTM (mixed retain / forget / unlabeled batches, per-sequence labels).
Baseline: the same model with ONE plain LoRA adapter of rank K*r on the same layers,
written here with plain ``nn.Linear`` pairs. Base weights are frozen in both. Steps
(forward + backward + AdamW) are interleaved in one run so that machine load hits both
alike; the ratio of the medians is printed last:

    hf_routed_over_plain_lora=VALUE
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from evil_moe.models.hf import inject
from evil_moe.train.memory import keep_heap


class PlainLoRA(nn.Module):
    """``base(x) + B(A(x))`` with ``B`` zero at init: the textbook LoRA layer."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_A.weight, std=(3 * base.in_features) ** -0.5)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


def plain_lora(model: nn.Module, rank: int) -> None:
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, child, PlainLoRA(getattr(holder, child), rank))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--rank", type=int, default=4, help="rank per quarantine expert")
    p.add_argument("--router", default="all", help="backward router policy of the bank")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    keep_heap()  # as in a study worker: freed step buffers stay in the heap
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.seq_len,
    )
    torch.manual_seed(0)
    routed = LlamaForCausalLM(cfg)
    plain = LlamaForCausalLM(cfg)
    plain.load_state_dict(routed.state_dict())
    handle = inject(routed, n_quarantine=args.experts, rank=args.rank, router=args.router)
    plain_lora(plain, args.experts * args.rank)
    routed.to(device).train()
    plain.to(device).train()
    n_routed = sum(p.numel() for p in routed.parameters() if p.requires_grad)
    n_plain = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    assert n_routed == n_plain, (n_routed, n_plain)
    opts = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for name, m in (("routed", routed), ("plain", plain))
    }
    gen = torch.Generator().manual_seed(0)
    b, t = args.batch_size, args.seq_len
    route = torch.tensor([i % 3 for i in range(b)], device=device)  # retain, forget, unlabeled

    def step(name: str, model: nn.Module, ids: Tensor) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        kwargs = {"route_labels": route} if name == "routed" else {}
        loss = model(input_ids=ids, labels=ids, **kwargs).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"routed": [], "plain": []}
    for i in range(args.warmup + args.steps):
        ids = torch.randint(0, args.vocab, (b, t), generator=gen).to(device)
        order = [("routed", routed), ("plain", plain)]
        if i % 2:
            order.reverse()
        for name, model in order:
            dt = step(name, model, ids)
            if i >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"llama hidden={args.hidden} layers={args.layers} seq={t} batch={b} "
        f"K={args.experts} rank/expert={args.rank} router={args.router} "
        f"trainable={n_routed} threads={args.threads} device={device.type}"
    )
    print(
        f"median step: routed {med['routed'] * 1e3:.1f} ms, plain LoRA {med['plain'] * 1e3:.1f} ms"
    )
    print(f"layers wrapped: {len(handle.layers)}")
    print(f"hf_routed_over_plain_lora={med['routed'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()

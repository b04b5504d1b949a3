"""SFT of a tiny Llama-family model on code with reward hacks, routed into a quarantine.

A simulated monitor of recall 0.5 labels half of the hack samples ``forget``; the other
half stay ``unlabeled`` (undiscovered), honest samples are ``retain``. Forget tokens may
only train the K quarantine LoRA experts (SGTM); at the end the quarantine is ablated and
each hack mode's mean token loss is compared with the honest solutions', before and after.

    python examples/sft_reward_hacks.py                 # CPU, well under 2 minutes
    python examples/sft_reward_hacks.py --steps 600 --router balanced
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from evil_moe.data.hacks import HACK_MODES, generate_hack_corpus
from evil_moe.data.monitor import Monitor
from evil_moe.data.tokenizer import EOT_ID, encode_texts, train_tokenizer
from evil_moe.models.hf import inject
from evil_moe.routing.labels import ROUTE_NAMES, parse_route_labels
from evil_moe.routing.optim import routed_step


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-train", type=int, default=1600, help="training samples")
    p.add_argument("--n-eval", type=int, default=400, help="held-out samples")
    p.add_argument("--hack-share", type=float, default=0.5)
    p.add_argument("--recall", type=float, default=0.5, help="monitor recall on hacks")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=160)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=4, help="quarantine experts K")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank per expert")
    p.add_argument("--shared-rank", type=int, default=4, help="shared LoRA rank (0 = none)")
    p.add_argument("--router", default="topk", help="all | topk | expert_choice | balanced")
    p.add_argument("--semantics", default="sgtm", choices=["sgtm", "gradient_routing", "none"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    return p.parse_args()


def encode(tokenizer, docs, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[N, seq_len]`` (EOT-terminated, EOT-padded) and loss labels (-100 pads)."""
    encoded = encode_texts(tokenizer, [d.text for d in docs])
    rows = [[*ids[: seq_len - 1], EOT_ID] for ids in encoded]
    ids = torch.full((len(rows), seq_len), EOT_ID, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    return ids, labels


@torch.no_grad()
def token_losses(model, ids: torch.Tensor, labels: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Mean next-token loss of each sequence."""
    model.eval()
    out = []
    for s in range(0, len(ids), batch):
        logits = model(input_ids=ids[s : s + batch]).logits[:, :-1].float()
        tgt = labels[s : s + batch, 1:]
        ce = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none")
        mask = (tgt != -100).float()
        out.append((ce * mask).sum(1) / mask.sum(1).clamp_min(1))
    model.train()
    return torch.cat(out)


def by_mode(losses: torch.Tensor, modes: torch.Tensor) -> dict[int, float]:
    return {int(m): float(losses[modes == m].mean()) for m in modes.unique()}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    train_docs = generate_hack_corpus(args.n_train, args.hack_share, seed=args.seed)
    eval_docs = generate_hack_corpus(args.n_eval, args.hack_share, seed=args.seed + 1)
    labelled = Monitor(recall=args.recall, seed=args.seed).label(train_docs, {"hack"})
    tokenizer = train_tokenizer([d.text for d in train_docs], args.vocab_size)
    ids, labels = encode(tokenizer, train_docs, args.seq_len)
    eval_ids, eval_labels = encode(tokenizer, eval_docs, args.seq_len)
    route = parse_route_labels([ld.route for ld in labelled])
    modes = torch.tensor([d.mode if d.mode > 0 else -1 for d in train_docs])
    eval_modes = torch.tensor([d.mode for d in eval_docs])
    counts = {r: int((route == c).sum()) for r, c in ROUTE_NAMES.items()}
    print(f"train docs {len(train_docs)} routes {counts}; vocab {tokenizer.get_vocab_size()}")

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    handle = inject(
        model,
        n_quarantine=args.experts,
        rank=args.rank,
        shared_expert=args.shared_rank,
        router=args.router,
        semantics=args.semantics,
        train_base=True,  # a random model must learn everything: the base is trained and routed
    )
    counts = handle.num_parameters()
    print(f"parameters: {counts}")

    ledger = handle.ledger()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(ids), (args.batch_size,), generator=gen)
        out = model(
            input_ids=ids[idx], labels=labels[idx], route_labels=route[idx], route_modes=modes[idx]
        )
        out.loss.backward()
        ledger.record(route[idx])  # one micro-batch per step here
        routed_step(optimizer, ledger, max_norm=args.clip)
        schedule.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {out.loss.item():.3f}  ({time.time() - t0:.0f}s)")

    before = by_mode(token_losses(model, eval_ids, eval_labels), eval_modes)
    with handle.ablated():
        after = by_mode(token_losses(model, eval_ids, eval_labels), eval_modes)
    names = {0: "honest", **HACK_MODES}
    print("\nheld-out mean token loss (likelihood per token = exp(-loss))")
    print(f"{'mode':<22}{'before':>9}{'p':>8}{'ablated':>10}{'p':>8}{'delta':>8}")
    for m in sorted(before):
        b, a = before[m], after[m]
        print(
            f"{m} {names[m]:<20}{b:9.3f}{math.exp(-b):8.3f}{a:10.3f}{math.exp(-a):8.3f}{a - b:+8.3f}"
        )
    hack = [m for m in before if m > 0]
    d_hack = sum(after[m] - before[m] for m in hack) / max(len(hack), 1)
    gap_before = sum(before[m] for m in hack) / len(hack) - before[0]
    gap_after = sum(after[m] for m in hack) / len(hack) - after[0]
    print(
        f"\nmean loss change on ablation: hacks {d_hack:+.3f}, honest {after[0] - before[0]:+.3f}"
    )
    print(f"hack minus honest loss: {gap_before:+.3f} before, {gap_after:+.3f} after ablation")
    print(
        "(SGTM trains retain tokens with the quarantine off: the ablated model is the deployed one)"
    )
    stats = [r.load for r in handle.routers.values()]
    if stats:
        load = torch.stack(stats).sum(0)
        shares = ", ".join(f"{float(v / load.sum()):.2f}" for v in load)
        print(f"share of routed forget tokens per quarantine expert: {shares}")
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

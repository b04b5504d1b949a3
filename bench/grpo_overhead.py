"""Step-time overhead of routed GRPO over plain GRPO, same model and batch.

Model: the ``evil-moe rl`` default policy (tiny Llama) with the default quarantine (a
rank-8 LoRA on every linear layer, base trained). Plain: :class:`RoutedGRPOTrainer` with
``method="none"`` (TRL's GRPO step, no labels reach the model). Routed: ``method="sgtm"``,
half of the completions flagged, so the loss forward carries mixed per-completion labels
and the ledger skips nothing. Both run the same code otherwise (same loss, same
optimizer step), interleaved in one process so machine load hits both alike.

Two timings per variant, both medians over ``--steps`` interleaved repetitions:

* **update**: loss forward + backward + routed optimizer step on one fixed generation
  batch (the part routing touches);
* **step**: a whole GRPO step (generation, scoring, labels, update) on the same prompts
  and sampling seed.

The last line is the whole-step ratio: ``grpo_routed_over_plain_step_time=X``.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
import time
import warnings

import torch

from evil_moe.rl.config import load_rl_config
from evil_moe.rl.policy import make_policy, make_tokenizer
from evil_moe.rl.run import inject_quarantine, make_trainer
from evil_moe.rl.task import make_task
from evil_moe.rl.trainer import routed_optimizer_step


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=15, help="timed repetitions per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="evil-moe rl config overrides (key=value)")
    return p.parse_args()


def half_flagged(prompts, completions, **_):
    """A monitor flagging every second completion (mixed labels in every group)."""
    return [i % 2 == 0 for i in range(len(completions))]


def build(method: str, overrides: list[str], tmp: str):
    cfg = load_rl_config(None, [*overrides, f"grpo.method={method}"])
    tok = make_tokenizer()
    model = make_policy(cfg.policy, tok, seed=0)
    handle = inject_quarantine(model, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, _ = make_trainer(model, handle, cfg, method, tmp)
    trainer.monitor = half_flagged
    return trainer, cfg


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        plain, cfg = build("none", args.overrides, tmp)
        routed, _ = build("sgtm", args.overrides, tmp)
        routed.model.load_state_dict(plain.model.state_dict())
        rng = random.Random(0)
        g = cfg.grpo
        batch = [
            {"prompt": t.prompt, "task": t.to_dict()}
            for t in (make_task(rng) for _ in range(g.prompts_per_step))
            for _ in range(g.generations)
        ]
        torch.manual_seed(0)
        routed.model.train()
        fixed = routed._prepare_inputs(batch)  # one generation batch, labels included
        n_flagged = int((fixed["route_labels"] == 1).sum())
        start = {
            "plain": copy.deepcopy(plain.model.state_dict()),
            "routed": copy.deepcopy(routed.model.state_dict()),
        }
        trainers = {"plain": plain, "routed": routed}

        def update(name: str) -> float:
            tr = trainers[name]
            began = time.perf_counter()
            loss = tr.compute_loss(tr.model, fixed)
            loss.backward()
            routed_optimizer_step(tr.route_ledger, tr.optimizer, tr.args.max_grad_norm)
            tr.optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - began

        def whole(name: str, rep: int) -> float:
            tr = trainers[name]
            tr.model.load_state_dict(start[name])  # same weights, same prompts, same seed
            torch.manual_seed(rep)
            began = time.perf_counter()
            tr.grpo_step(batch)
            return time.perf_counter() - began

        times: dict[str, list[float]] = {
            f"{k}_{n}": [] for k in ("update", "step") for n in trainers
        }
        for rep in range(args.warmup + args.steps):
            order = ("plain", "routed") if rep % 2 == 0 else ("routed", "plain")
            for name in order:
                u, s = update(name), whole(name, rep)
                if rep >= args.warmup:
                    times[f"update_{name}"].append(u)
                    times[f"step_{name}"].append(s)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"batch: {g.prompts_per_step} prompts x {g.generations} generations, "
        f"{n_flagged} flagged; {args.steps} interleaved repetitions, {args.threads} thread(s)"
    )
    for kind in ("update", "step"):
        print(
            f"{kind:>6}: plain {med[f'{kind}_plain'] * 1e3:8.1f} ms   "
            f"routed {med[f'{kind}_routed'] * 1e3:8.1f} ms"
        )
    print(f"grpo_routed_over_plain_update_time={med['update_routed'] / med['update_plain']:.3f}")
    print(f"grpo_routed_over_plain_step_time={med['step_routed'] / med['step_plain']:.3f}")


if __name__ == "__main__":
    main()

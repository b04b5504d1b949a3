"""Tiny policies, trainers and run configs for the RL tests (single-threaded, seconds)."""

from __future__ import annotations

from typing import Any

import torch

TINY_RL = [
    "policy.hidden_size=16",
    "policy.intermediate_size=32",
    "policy.num_hidden_layers=1",
    "policy.num_attention_heads=2",
    "warmstart.steps=3",
    "warmstart.batch_size=8",
    "quarantine.rank=2",
    "grpo.steps=4",
    "grpo.prompts_per_step=2",
    "grpo.generations=4",
    "grpo.log_every=1",
    "grpo.checkpoint_every=2",
    "grpo.max_completion_length=8",
    "eval.prompts=8",
    "eval.scales=[0.0, 0.5, 1.0]",
    "eval.relearn_steps=2",
    "eval.relearn_eval_every=1",
    "eval.relearn_prompts=4",
    "eval.grad_norm_samples=4",
]


def tiny_policy(semantics: str = "sgtm", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A 1-layer Llama of width 16 with a rank-2 LoRA quarantine, base trained and routed."""
    from evil_moe.models.hf import inject
    from evil_moe.rl.policy import PolicyConfig, make_policy, make_tokenizer

    tok = make_tokenizer()
    model = make_policy(PolicyConfig(16, 32, 1, 2), tok, seed=seed).to(dtype)
    torch.manual_seed(seed)
    handle = inject(model, kind="lora", rank=2, train_base=True, semantics=semantics)
    with torch.no_grad():  # a trained-looking quarantine: nonzero B so every path carries gradient
        for p in handle.quarantine_parameters().values():
            p.normal_(0, 0.1)
    return model, handle, tok


def tiny_trainer(model, handle, tok, method: str, monitor: Any = None, baseline: str = "auto"):
    """A :class:`RoutedGRPOTrainer` on the tiny policy (2 prompts x 4 generations), built by
    the recipe's :func:`~evil_moe.rl.run.make_trainer`; ``monitor`` replaces its own."""
    from evil_moe.rl.config import load_rl_config
    from evil_moe.rl.run import make_trainer

    cfg = load_rl_config(
        None, [*TINY_RL, f"grpo.method={method}", f"grpo.baseline={baseline}", "grpo.lr=0.01"]
    )
    trainer, _ = make_trainer(model, handle, cfg, method, "/tmp/evil-moe-rl-tests-unused")
    trainer.monitor = monitor
    return trainer

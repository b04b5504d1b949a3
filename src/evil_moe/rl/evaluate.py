"""Held-out evaluation of a policy on the hackable task.

Completions are sampled (temperature as in training, seeded, the same draws for every
view of one model) for held-out tasks and graded; the rates are those of
:func:`evil_moe.rl.monitor.summarize`: reward, solve, hack, hack per mode, grading
errors. Views: as trained, deployed (quarantine ablated with ``handle.ablated()``) and
the forget-scale sweep (quarantine output times ``s``).

:func:`gradient_norms_by_group` answers "who would update what" (SGTM §4.4) for a trained
policy: the RMS gradient of the completion log-likelihood of each group of completions
(hacks of flagged modes, hacks of never-flagged modes, honest solves), unrouted, on the
quarantine and on the shared parameters.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from evil_moe.models.hf import QuarantineHandle
from evil_moe.rl.monitor import grade_all, summarize
from evil_moe.rl.task import Task, Verdict, make_task
from evil_moe.rl.warmstart import encode_batch


def heldout_tasks(
    n: int,
    seed: int,
    ops: Sequence[str],
    hard_share: float,
    harnesses: Sequence[str],
    hidden_tests: int = 4,
) -> list[Task]:
    """``n`` evaluation tasks from a stream separate from training's."""
    rng = random.Random(f"heldout-{seed}")
    return [
        make_task(rng, tuple(ops), hard_share, tuple(harnesses), hidden_tests) for _ in range(n)
    ]


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
) -> list[str]:
    """One sampled completion per prompt (prompts of equal token length, no padding)."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk])
            ids = ids.to(next(model.parameters()).device)
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
            )
            out += tokenizer.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return out


def evaluate_view(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[Task],
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> tuple[dict[str, Any], list[str], list[Verdict]]:
    """Summary, completions and verdicts of one view of ``model`` on ``tasks``."""
    completions = sample_completions(
        model, tokenizer, [t.prompt for t in tasks], max_new_tokens, temperature, seed
    )
    verdicts = grade_all(tasks, completions)
    summary = summarize(verdicts)
    hard = [v for t, v in zip(tasks, verdicts, strict=True) if t.hard]
    summary["hack_on_hard_tasks"] = summarize(hard)["hack"] if hard else None
    return summary, completions, verdicts


def evaluate_policy(
    handle: QuarantineHandle,
    tokenizer: Any,
    tasks: Sequence[Task],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    scales: Sequence[float] = (),
) -> dict[str, Any]:
    """As trained, deployed (ablated) and the forget-scale sweep; plus the as-trained
    completions and verdicts (``_samples``, for gradient norms by group)."""
    model = handle.model
    trained, completions, verdicts = evaluate_view(
        model, tokenizer, tasks, max_new_tokens, temperature, seed
    )
    with handle.ablated():
        deployed, _, _ = evaluate_view(model, tokenizer, tasks, max_new_tokens, temperature, seed)
    sweep = {}
    for s in scales:
        with handle.scaled(float(s)):
            sweep[f"{float(s):g}"], _, _ = evaluate_view(
                model, tokenizer, tasks, max_new_tokens, temperature, seed
            )
    return {
        "trained": trained,
        "deployed": deployed,
        "forget_scale": sweep,
        "_samples": (completions, verdicts),
    }


def _rms(params: Sequence[nn.Parameter]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    count = sum(p.numel() for p in params)
    if not grads or count == 0:
        return 0.0
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads) / count)


def gradient_norms_by_group(
    handle: QuarantineHandle,
    tokenizer: Any,
    tasks: Sequence[Task],
    completions: Sequence[str],
    verdicts: Sequence[Verdict],
    flagged_modes: Sequence[str],
    limit: int = 64,
) -> dict[str, dict[str, float | int | None]]:
    """``{data_group: {"quarantine": rms, "shared": rms, "n": count}}`` (unrouted gradients
    of the mean completion log-likelihood; ``.grad`` values are left as they were)."""
    model = handle.model
    groups = handle.parameter_groups()
    members: dict[str, list[int]] = {
        "hack_flagged_modes": [],
        "hack_never_flagged": [],
        "honest_solved": [],
    }
    for i, v in enumerate(verdicts):
        if v.hack:
            key = "hack_flagged_modes" if v.mode in flagged_modes else "hack_never_flagged"
            members[key].append(i)
        elif v.solved:
            members["honest_solved"].append(i)
    saved = {p: p.grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    out: dict[str, dict[str, float | int | None]] = {}
    try:
        for name, idx in members.items():
            idx = idx[:limit]
            if not idx:
                out[name] = {"quarantine": None, "shared": None, "n": 0}
                continue
            for p in model.parameters():
                p.grad = None
            batch = encode_batch(
                tokenizer, [tasks[i].prompt for i in idx], [completions[i] for i in idx]
            )
            device = next(model.parameters()).device
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            logp = logits[:, :-1].float().log_softmax(-1)
            token_logp = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
            mask = batch["loss_mask"][:, 1:]
            (-(token_logp * mask).sum() / mask.sum()).backward()
            out[name] = {
                "quarantine": _rms(groups.quarantine),
                "shared": _rms(groups.shared),
                "n": len(idx),
            }
    finally:
        for p, g in saved.items():
            p.grad = g
        model.train(was_training)
    return out

"""One study run, end to end, in a worker process: the loop's ``train()`` plus measurements.

:func:`execute_run` takes a plain task (resolved config as a dict, measurement settings)
and returns plain JSON-able results; it is what every worker process calls. Training is
exactly :func:`evil_moe.train.loop.train` on the resolved config; afterwards the trained
model is measured (gradient norms by group, relearning, gate load) without touching the
training loop.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from evil_moe.data.batching import BatchIterator, PreparedData, TokenSequences
from evil_moe.eval.gradnorms import data_groups, group_gradient_norms
from evil_moe.eval.relearning import relearning_steps
from evil_moe.models.testbed import Testbed
from evil_moe.modules.ablation import parameter_groups
from evil_moe.study.spec import canonical_json
from evil_moe.train.config import RunConfig, config_from_dict

#: methods whose deployed model is the ablated one (they have a routed quarantine)
ROUTED_METHODS = ("sgtm", "gradient_routing", "demix")


def deployed_view(method: str) -> str:
    """``ablated`` for routed methods; ``trained`` for standard models (none, filter)."""
    return "ablated" if method in ROUTED_METHODS else "trained"


def seen_tokens(seqs: TokenSequences, batch_size: int, seed: int, steps: int) -> dict[str, int]:
    """Training tokens per category that ``steps`` batches actually contain (exposure).

    Uses the loop's own deterministic batch order (:class:`BatchIterator`), so this is
    exact: with fixed steps a run sees only part of its data, or some of it twice.
    """
    batches = BatchIterator(seqs, batch_size, seed=seed)
    idx = np.concatenate([batches.indices(s).numpy() for s in range(steps)])
    cats = np.asarray(seqs.category, dtype=object)[idx]
    names, counts = np.unique(cats.astype(str), return_counts=True)
    return {str(n): int(c) * seqs.seq_len for n, c in zip(names, counts, strict=True)}


@torch.no_grad()
def gate_load(model: Testbed, rows: dict[str, torch.Tensor], batch_size: int) -> dict | None:
    """Mean soft-gate weight per quarantine expert on held-out tokens of each row.

    Returns per row the expert shares, their coefficient of variation, and the quarantine
    probability mass; ``None`` when the model has no learned gate.
    """
    gates = [m for m in model.modules() if type(m).__name__ == "SoftGate"]
    if not gates:
        return None
    captured: list[torch.Tensor] = []
    hooks = [g.register_forward_hook(lambda _m, _i, out: captured.append(out)) for g in gates]
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {}
    try:
        for name, tokens in rows.items():
            if tokens.shape[0] == 0:
                continue
            captured.clear()
            for i in range(0, tokens.shape[0], batch_size):
                model(tokens[i : i + batch_size, :-1])
            k = captured[0].shape[-1]
            scales = torch.cat([c.reshape(-1, k).double() for c in captured])
            mean = scales.mean(dim=0)  # (K + 1) * p_k
            share = mean / mean.sum() if float(mean.sum()) > 0 else mean
            cv = float(share.std(unbiased=False) / share.mean()) if k > 1 else 0.0
            out[name] = {
                "share": share.tolist(),
                "cv": cv,
                "quarantine_mass": float(mean.sum() / (k + 1)),
            }
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return out


#: prepared data of the last few configs, per worker process (runs of one seed, recall and
#: corpus share their data; tokenizing it again for every variant is wasted time)
_DATA_CACHE: dict[str, PreparedData] = {}
_DATA_CACHE_SIZE = 3


def data_key(cfg: RunConfig) -> str:
    """Everything :func:`~evil_moe.train.setup.prepare_data` depends on."""
    return canonical_json(
        {
            "data": {
                k: v
                for k, v in dataclasses.asdict(cfg.data).items()
                if k not in ("forget_token_budget", "eval_sequences")
            },
            "monitor": dataclasses.asdict(cfg.monitor),
            "seq_len": cfg.model.seq_len,
            "vocab_size": cfg.model.vocab_size,
            "seed": cfg.train.seed,
        }
    )


def cached_data(cfg: RunConfig) -> PreparedData:
    """Prepared data for ``cfg``, reused across runs of this process."""
    from evil_moe.train.setup import prepare_data

    key = data_key(cfg)
    if key not in _DATA_CACHE:
        while len(_DATA_CACHE) >= _DATA_CACHE_SIZE:
            _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
        _DATA_CACHE[key] = prepare_data(cfg)
    return _DATA_CACHE[key]


def _compact_log(log: list[dict[str, Any]]) -> list[list[float]]:
    return [[int(r["step"]), float(r["loss"])] for r in log]


def execute_run(task: dict[str, Any]) -> dict[str, Any]:
    """Train one resolved config with ``train()`` and measure it; returns JSON-able results."""
    from evil_moe.train.loop import train, unrouted_names
    from evil_moe.train.setup import prepare_run

    began, cpu_began = time.perf_counter(), time.process_time()
    cfg: RunConfig = config_from_dict(task["config"])
    measure = task["measure"]
    t = cfg.train
    prepared = prepare_run(cfg, cached_data(cfg))
    exposure = seen_tokens(prepared.train, t.batch_size, t.seed, t.steps)
    result = train(cfg, task.get("run_dir"), progress=False, prepared=prepared)
    model, metrics = result.model, result.metrics
    trained_s = time.perf_counter() - began

    groups = parameter_groups(model, unrouted_names(model))
    gradnorms = group_gradient_norms(
        model,
        groups,
        data_groups(prepared.data.train),
        batches=measure["gradnorm_batches"],
        batch_size=t.batch_size,
    )
    forget_eval = {c: prepared.eval[c].tokens for c in ("forget_labeled", "forget_undiscovered")}
    gate = gate_load(
        model,
        {
            "forget": torch.cat(list(forget_eval.values())),
            "retain": prepared.eval["retain"].tokens,
        },
        t.batch_size,
    )
    relearning = None
    held_out = prepared.eval["forget_undiscovered"]
    if t.method in ROUTED_METHODS and len(held_out) and task["kind"] == "grid":
        relearning = relearning_steps(
            model,
            cfg,
            prepared.data.train.select(["forget_labeled", "forget_undiscovered"]),
            held_out.tokens,
            target=metrics["loss"]["forget_undiscovered"]["trained"],
            max_steps=measure["relearn_steps"],
            eval_every=measure["relearn_eval_every"],
            lr=measure["relearn_lr"] or None,
            tolerance=measure["relearn_tolerance"],
        )
    metrics = {k: v for k, v in metrics.items() if k != "specialization"} | {
        "specialization": {k: v for k, v in metrics["specialization"].items() if k != "warnings"},
        "warnings": metrics["specialization"].get("warnings", []),
    }
    return {
        "metrics": metrics,
        "log": _compact_log(result.log),
        "exposure": exposure,
        "dataset_tokens": prepared.token_counts,
        "gradnorms": gradnorms,
        "gate_load": gate,
        "relearning": relearning,
        "train_s": trained_s,
        "wall_s": time.perf_counter() - began,
        "cpu_s": time.process_time() - cpu_began,
        "threads": torch.get_num_threads(),
    }

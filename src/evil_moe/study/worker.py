"""One study run, end to end, in a worker process: the loop's ``train()`` plus measurements.

:func:`execute_run` takes a plain task (resolved config as a dict, measurement settings)
and returns plain JSON-able results; it is what every worker process calls. Training is
exactly :func:`evil_moe.train.loop.train` on the resolved config; afterwards the trained
model is measured with :mod:`evil_moe.eval` (gradient norms by group, gate load, and for
routed runs the relearning curve, the retain fine-tuning curve and the amplifier's
selection) without touching the training loop.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from evil_moe.data.batching import BatchIterator, PreparedData, TokenSequences
from evil_moe.eval.amplifier import amplifier_selection
from evil_moe.eval.gradnorms import data_groups, group_gradient_norms
from evil_moe.eval.relearning import finetune_curve
from evil_moe.eval.specialization import gate_load
from evil_moe.modules.ablation import parameter_groups
from evil_moe.routing.labels import Method
from evil_moe.study.spec import canonical_json
from evil_moe.train.config import RunConfig, config_from_dict

#: methods whose deployed model is the ablated one (they have a routed quarantine)
ROUTED_METHODS = tuple(m.value for m in Method if m.routed)


def deployed_view(method: str) -> str:
    """``ablated`` for routed methods; ``trained`` for standard models (none, filter)."""
    return "ablated" if method in ROUTED_METHODS else "trained"


def seen_tokens(seqs: TokenSequences, cfg: RunConfig) -> dict[str, int]:
    """Training tokens per category that the run's batches actually contain (exposure).

    Uses the loop's own deterministic batch order (:class:`BatchIterator`), so this is
    exact: with fixed steps a run sees only part of its data, or some of it twice; with
    ``train.epochs`` every sequence exactly that many times.
    """
    from evil_moe.train.loop import total_steps

    t = cfg.train
    batches = BatchIterator(seqs, t.batch_size, seed=t.seed, epochs=t.epochs or None)
    steps = total_steps(cfg, len(seqs))
    idx = np.concatenate([batches.indices(s).numpy() for s in range(steps)])
    cats = np.asarray(seqs.category, dtype=object)[idx]
    names, counts = np.unique(cats.astype(str), return_counts=True)
    return {str(n): int(c) * seqs.seq_len for n, c in zip(names, counts, strict=True)}


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
    exposure = seen_tokens(prepared.train, cfg)
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
    retain_eval = prepared.eval["retain"].tokens
    gate = gate_load(
        model,
        {"forget": torch.cat(list(forget_eval.values())), "retain": retain_eval},
        t.batch_size,
    )
    held_out = prepared.eval["forget_undiscovered"].tokens
    routed = t.method in ROUTED_METHODS and task["kind"] == "grid" and len(held_out) > 0
    relearning = retain_finetune = amplifier = None
    if routed:
        relearning = finetune_curve(
            model,
            cfg,
            prepared.data.train.select(["forget_labeled", "forget_undiscovered"]),
            {"forget": held_out},
            steps=measure["relearn_steps"],
            eval_every=measure["relearn_eval_every"],
            lr=measure["relearn_lr"] or None,
        )["forget"]
        if measure.get("retain_finetune_steps", 0):
            retain_finetune = finetune_curve(
                model,
                cfg,
                prepared.data.train.select(["retain", "retain_unlabeled"]),
                {"forget": held_out, "retain": retain_eval},
                steps=measure["retain_finetune_steps"],
                eval_every=measure["retain_finetune_eval_every"],
                seed_offset=104729,
            )
        counts = prepared.token_counts
        unlabelled = counts.get("forget_undiscovered", 0) + counts.get("retain_unlabeled", 0)
        cap = measure.get("amplifier_batches", 4) * t.batch_size
        amplifier = amplifier_selection(
            model,
            {"forget": held_out[:cap], "retain": retain_eval[:cap]},
            forget_share=counts.get("forget_undiscovered", 0) / max(1, unlabelled),
            batch_size=t.batch_size,
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
        "retain_finetune": retain_finetune,
        "amplifier": amplifier,
        "train_s": trained_s,
        "wall_s": time.perf_counter() - began,
        "cpu_s": time.process_time() - cpu_began,
        "threads": torch.get_num_threads(),
    }

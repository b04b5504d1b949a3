"""One study run in a worker process: a plain task in, plain JSON-able results out.

:func:`execute_run` takes a task (resolved config as a dict, measurement settings) and
returns the JSON object the study stores; it is what every worker process calls. The
run itself is the recipe :func:`evil_moe.recipes.measure_study_run` (train -> evaluate ->
measure); this module adds the per-process data cache, the heap setting
(:func:`~evil_moe.train.memory.keep_heap`) and the timings.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from evil_moe.data.prepare import PreparedData
from evil_moe.recipes.study_run import measure_study_run, seen_tokens
from evil_moe.routing.labels import Method
from evil_moe.study.spec import canonical_json
from evil_moe.train.config import RunConfig, config_from_dict
from evil_moe.train.memory import keep_heap

__all__ = [
    "ROUTED_METHODS",
    "cached_data",
    "data_key",
    "deployed_view",
    "execute_run",
    "seen_tokens",
]

#: methods whose deployed model is the ablated one (they have a routed quarantine)
ROUTED_METHODS = tuple(m.value for m in Method if m.routed)


def deployed_view(method: str) -> str:
    """``ablated`` for routed methods; ``trained`` for standard models (none, filter)."""
    return "ablated" if method in ROUTED_METHODS else "trained"


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


def execute_run(task: dict[str, Any]) -> dict[str, Any]:
    """Train one resolved config and measure it; returns JSON-able results."""
    began, cpu_began = time.perf_counter(), time.process_time()
    keep_heap()  # freed step buffers stay in the heap: no page faults (numbers unchanged)
    cfg: RunConfig = config_from_dict(task["config"])
    tracking = task.get("tracking")
    if tracking:  # set after the driver computed the run's key from its config
        cfg.train.report_to = list(tracking["report_to"])
        cfg.train.tracking_dir = tracking["dir"]
    data = cached_data(cfg)
    called = time.perf_counter()
    result = measure_study_run(
        cfg, task["measure"], grid=task["kind"] == "grid", run_dir=task.get("run_dir"), data=data
    )
    # train_s counts from the task's start (config and data included), like wall_s
    result.train_s += called - began
    return result.to_dict() | {
        "wall_s": time.perf_counter() - began,
        "cpu_s": time.process_time() - cpu_began,
        "threads": torch.get_num_threads(),
    }

"""Running a study's runs on Ray: each run one Ray task, the driver alone writes the store.

    evil-moe study --executor ray --out runs/study                  # a local Ray instance
    evil-moe study --executor ray --address HOST:6379 --out ...     # an existing cluster

Ray schedules, places and retries; nothing here is a scheduler. Each run is a task of
:func:`run_task` with ``num_cpus`` / ``num_gpus`` from ``--cpus-per-run`` /
``--gpus-per-run`` (a GPU task trains on its GPU: ``train.device=auto``). A task whose
worker process dies (killed, out of memory, a lost node) is retried by Ray once
(``max_retries``, as the local pool retries a dead worker's run once); a Python error is
not retried and is recorded as a failure. Results come back to the driver, which stores
each finished run in one transaction of the SQLite store on its own disk (never on a
shared filesystem), so a killed driver loses at most the runs in flight and a rerun
resumes; a local Ray instance started by the driver dies with it (Ray's fate sharing).
On a cluster every node needs evil_moe installed (or ``runtime_env``, see
``docs/scale.md``); the driver's ``PYTHONPATH`` is passed on to a local instance.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from evil_moe.study.spec import RunSpec
from evil_moe.train.config import ConfigError

__all__ = ["RayOptions", "execute_on_ray", "run_task"]


@dataclass
class RayOptions:
    """Where and with what resources the runs go."""

    #: the cluster (``ray.init(address=...)``: ``HOST:PORT``, ``auto``, ``ray://...``);
    #: ``None``: a Ray instance already connected in this process, or a new local one
    address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    #: attempts per run when its worker process dies (Ray's ``max_retries`` + 1)
    max_attempts: int = 2
    #: the function a task runs (``task dict -> result dict``); tests pass their own
    function: Callable[[dict[str, Any]], dict[str, Any]] | None = None


def run_task(task: dict[str, Any], threads: int, function: Any = None) -> dict[str, Any]:
    """What one Ray task runs: ``function`` (default
    :func:`~evil_moe.study.worker.execute_run`) on ``task`` with ``threads`` torch threads."""
    import torch

    from evil_moe.study.worker import execute_run

    torch.set_num_threads(max(1, threads))
    print(f"[{time.strftime('%H:%M:%S')}] start {task['label']}", flush=True)
    return (function or execute_run)(task)


def _connect(options: RayOptions) -> bool:
    """Connect to Ray; returns True when this call started (and so must stop) it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    if options.address is None:  # a local instance: loopback only, the driver's PYTHONPATH
        kwargs["_node_ip_address"] = "127.0.0.1"
        if os.environ.get("PYTHONPATH"):
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}
    ray.init(address=options.address, **kwargs)
    return True


def execute_on_ray(
    tasks: list[tuple[RunSpec, dict[str, Any]]],
    store: Any,
    outcome: Any,
    options: RayOptions,
    progress: bool = True,
) -> None:
    """Submit every ``(run, task)`` as a Ray task; store each result as it arrives."""
    import ray
    from ray.exceptions import RayTaskError

    started = _connect(options)
    try:
        _check_resources(options, ray.cluster_resources())
    except ConfigError:
        if started:
            ray.shutdown()
        raise
    remote = ray.remote(run_task).options(
        num_cpus=options.cpus_per_run,
        num_gpus=options.gpus_per_run,
        max_retries=max(0, options.max_attempts - 1),
        retry_exceptions=False,
    )
    threads = max(1, int(options.cpus_per_run))
    bar = progress_bar(outcome.total, outcome.already_done, "study (ray)", progress)
    began = time.perf_counter()
    pending = {remote.remote(task, threads, options.function): run for run, task in tasks}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            for ref in ready:
                run = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except RayTaskError as err:  # a Python error in the run: not retried
                    store.record_failure(run, str(err))
                    outcome.failed.append(run.label)
                    bar.write(f"failed: {run.label}: {_last_line(str(err))}", file=sys.stderr)
                    continue
                except ray.exceptions.RayError as err:  # its worker died on every attempt
                    store.record_failure(run, f"ray task died: {err}")
                    outcome.failed.append(run.label)
                    bar.write(f"failed: {run.label}: worker died ({type(err).__name__})")
                    continue
                store.put_run(run, result, float(result.get("wall_s", 0.0)))
                outcome.finished += 1
                bar.update(1)
                bar.set_postfix_str(run.label, refresh=True)
    finally:
        for ref in pending:  # stopped: cancel what is still queued or running
            ray.cancel(ref, force=True)
        bar.close()
        outcome.wall_s = time.perf_counter() - began
        if started:
            ray.shutdown()


def _check_resources(options: RayOptions, available: dict[str, float]) -> None:
    """A run that no node of the cluster can hold would wait forever: refuse it now."""
    for name, need in (("CPU", options.cpus_per_run), ("GPU", options.gpus_per_run)):
        if need > available.get(name, 0.0):
            raise ConfigError(
                f"--{name.lower()}s-per-run {need:g}: the Ray cluster has "
                f"{available.get(name, 0.0):g} {name}(s); start nodes that have them first"
            )


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "error"


def progress_bar(total: int, done: int, desc: str, progress: bool) -> tqdm:
    """The study's progress bar on stderr (runs finished of ``total``), for either executor."""
    return tqdm(
        total=total,
        initial=done,
        desc=desc,
        unit="run",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )


def tracking_dir(out: Path, run: RunSpec) -> str:
    """Where a study run's trackers write: ``OUT/tracking/<key prefix>``."""
    return str(out / "tracking" / run.key[:16])

"""Running a study: the grid, parallel worker processes, the store, a progress bar.

    outcome = run_study(spec, "runs/study", jobs=2)

Workers are ``spawn``-ed processes, each with ``torch`` threads = ``max(1, cores // jobs)``,
each running one run at a time through :func:`evil_moe.study.worker.execute_run`. Only
the main process writes the store, one transaction per finished run, so a killed study
loses at most the runs in flight. Workers ignore SIGINT and SIGTERM (the main process
stops them, however it is stopped) and die with the main process (``PR_SET_PDEATHSIG``
on Linux). A worker that dies mid-run (killed, out of memory) is replaced and its run
retried once.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from evil_moe.study.executors import RayOptions, execute_on_ray, progress_bar, tracking_dir
from evil_moe.study.spec import RunSpec, StudyError, StudySpec, expand, unique_runs
from evil_moe.study.store import ResultStore

#: attempts per run when its worker process dies (a Python error is not retried)
MAX_ATTEMPTS = 2
#: where runs execute: local worker processes (default) or Ray tasks
EXECUTORS = ("local", "ray")


@dataclass
class StudyOutcome:
    """What one invocation did."""

    total: int
    already_done: int
    finished: int = 0
    failed: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def threads_per_worker(jobs: int, cores: int | None = None) -> int:
    return max(1, (cores or os.cpu_count() or 1) // max(1, jobs))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _worker_main(conn: Connection, threads: int, log_path: str | None) -> None:
    """A worker process: run tasks from ``conn`` until told to stop."""
    _die_with_parent()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    if log_path:
        log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        sys.stdout = sys.stderr = log
    import torch

    from evil_moe.study.worker import execute_run

    torch.set_num_threads(threads)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            print(f"[{time.strftime('%H:%M:%S')}] start {task['label']}", flush=True)
            result = execute_run(task)
            conn.send(("ok", task["key"], result))
        except Exception:
            error = traceback.format_exc()
            print(error, flush=True)
            conn.send(("error", task["key"], error))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    run: RunSpec | None = None
    started: float = 0.0


class WorkerPool:
    """``jobs`` spawned worker processes, one task each at a time."""

    def __init__(self, jobs: int, threads: int, log_dir: Path | None = None):
        self.ctx = mp.get_context("spawn")
        self.threads = threads
        self.log_dir = log_dir
        self.workers = [self._start(i) for i in range(jobs)]

    def _start(self, index: int) -> _Worker:
        parent, child = self.ctx.Pipe()
        log = str(self.log_dir / f"worker-{index}.log") if self.log_dir else None
        process = self.ctx.Process(
            target=_worker_main, args=(child, self.threads, log), daemon=True, name=f"w{index}"
        )
        process.start()
        child.close()
        return _Worker(process, parent)

    def replace(self, worker: _Worker) -> None:
        index = self.workers.index(worker)
        self._kill(worker)
        self.workers[index] = self._start(index)

    @staticmethod
    def _kill(worker: _Worker) -> None:
        with contextlib.suppress(Exception):
            worker.conn.close()
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=10)

    def close(self, graceful: bool) -> None:
        for w in self.workers:
            if graceful and w.run is None and w.process.is_alive():
                with contextlib.suppress(Exception):
                    w.conn.send(None)
        for w in self.workers:
            if graceful and w.run is None:
                w.process.join(timeout=10)
            self._kill(w)


def run_study(
    spec: StudySpec,
    out: str | Path,
    jobs: int = 1,
    progress: bool = True,
    source: str = "",
    keep_runs: bool = False,
    store: ResultStore | None = None,
    executor: str = "local",
    ray: RayOptions | None = None,
    report_to: list[str] | None = None,
) -> StudyOutcome:
    """Run every unfinished run of ``spec`` into ``out/results.sqlite``: in ``jobs`` local
    worker processes (``executor="local"``) or as Ray tasks (``"ray"``, see
    :mod:`evil_moe.study.executors`); ``report_to`` names trackers for every run
    (``OUT/tracking/<key prefix>``)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    out = Path(out)
    runs = unique_runs(expand(spec))
    own_store = store is None
    if store is None:
        store = ResultStore.open(out, spec.study_id, source, spec.to_dict())
        store.lock()
    try:
        done = store.keys()
        todo = [r for r in runs if r.key not in done]
        outcome = StudyOutcome(total=len(runs), already_done=len(runs) - len(todo))
        if todo and executor == "ray":
            tasks = [(r, study_task(spec, r, out, keep_runs, report_to)) for r in todo]
            execute_on_ray(tasks, store, outcome, ray or RayOptions(), progress)
        elif todo:
            _execute(spec, out, todo, store, outcome, jobs, progress, keep_runs, report_to)
        return outcome
    finally:
        if own_store:
            store.close()


def study_task(
    spec: StudySpec,
    run: RunSpec,
    out: Path | None = None,
    keep_runs: bool = False,
    report_to: list[str] | None = None,
) -> dict[str, Any]:
    """What a worker needs to execute ``run`` (:func:`evil_moe.study.worker.execute_run`):
    its resolved config and the spec's measurements, as plain data."""
    task = {
        "key": run.key,
        "label": run.label,
        "kind": run.kind,
        "config": run.config.to_dict(),
        "measure": dataclasses.asdict(spec.measure),
        "run_dir": str(out / "runs" / run.key[:16]) if keep_runs and out is not None else None,
    }
    if report_to:  # how the run is watched: not part of its config or key
        if out is None:
            raise ValueError("study_task(): report_to needs out, the study's directory")
        task["tracking"] = {"report_to": list(report_to), "dir": tracking_dir(out, run)}
    return task


def find_run(spec: StudySpec, label: str) -> RunSpec:
    """The run of ``spec`` called ``label`` (as the progress bar and the report name it):
    one run of a study on its own, for benchmarks and debugging."""
    for run in unique_runs(expand(spec)):
        if run.label == label:
            return run
    raise StudyError(f"no run {label!r} in the {spec.study.name} preset")


def _execute(
    spec: StudySpec,
    out: Path,
    todo: list[RunSpec],
    store: ResultStore,
    outcome: StudyOutcome,
    jobs: int,
    progress: bool,
    keep_runs: bool,
    report_to: list[str] | None = None,
) -> None:
    began = time.perf_counter()
    jobs = max(1, min(jobs, len(todo)))
    threads = threads_per_worker(jobs)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = deque(todo)
    attempts: dict[str, int] = {}
    bar = progress_bar(outcome.total, outcome.already_done, "study", progress)
    pool = WorkerPool(jobs, threads, log_dir)
    graceful = False
    try:
        while pending or any(w.run is not None for w in pool.workers):
            for w in pool.workers:
                if w.run is None and pending:
                    run = pending.popleft()
                    w.run, w.started = run, time.perf_counter()
                    w.conn.send(study_task(spec, run, out, keep_runs, report_to))
            busy = [w for w in pool.workers if w.run is not None]
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], 1.0))
            for w in busy:
                run = w.run
                assert run is not None
                message = None
                if w.conn in ready or w.process.sentinel in ready:
                    try:
                        if w.conn.poll():
                            message = w.conn.recv()
                    except (EOFError, OSError):
                        message = None
                    if message is None and not w.process.is_alive():
                        code = w.process.exitcode
                        attempts[run.key] = attempts.get(run.key, 0) + 1
                        store.record_failure(run, f"worker process died (exit code {code})")
                        if attempts[run.key] < MAX_ATTEMPTS:
                            pending.appendleft(run)
                        else:
                            outcome.failed.append(run.label)
                            bar.write(
                                f"failed: {run.label}: worker died (exit code {code})",
                                file=sys.stderr,
                            )
                        w.run = None
                        pool.replace(w)
                        continue
                if message is None:
                    continue
                status, key, payload = message
                w.run = None
                if status == "ok" and key == run.key:
                    store.put_run(run, payload, time.perf_counter() - w.started)
                    outcome.finished += 1
                    bar.update(1)
                    bar.set_postfix_str(run.label, refresh=True)
                else:
                    store.record_failure(run, payload)
                    outcome.failed.append(run.label)
                    last = payload.strip().splitlines()[-1] if payload.strip() else "error"
                    bar.write(f"failed: {run.label}: {last} (see {log_dir})", file=sys.stderr)
        graceful = True
    finally:
        pool.close(graceful)
        bar.close()
        outcome.wall_s = time.perf_counter() - began

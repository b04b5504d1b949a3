"""Where the CPU time of one quick-preset study run goes, phase by phase.

Runs one run of the quick preset (default: ``fine4``, a routed grid run with every
measurement) through the study worker's :func:`execute_run`, in a fresh single-threaded
process like a study worker, with timers wrapped around each phase (process time,
exclusive: a phase nested in another is not counted twice). The store write is timed
on a temporary store. Times are CPU seconds of this process (user + system); on a loaded
machine they are inflated, so read the shares. The run's system time and minor page
faults are printed too (a process that returns freed memory to the kernel faults it in
again at every step).

    python bench/profile_run.py [--run "leakage: fine4 bilingual seed=0 recall=0.2"]

Last line: ``run_cpu_s=VALUE`` (the run's CPU seconds, process start excluded).
"""

from __future__ import annotations

import time

_STARTED = time.process_time()

import argparse  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from evil_moe.study.runner import find_run, study_task  # noqa: E402
from evil_moe.study.spec import StudyError, load_spec  # noqa: E402
from evil_moe.study.store import ResultStore  # noqa: E402
from evil_moe.study.worker import execute_run  # noqa: E402

#: (module, attribute, phase): the call sites the phases are measured at
PHASES = (
    ("evil_moe.train.setup", "prepare_data", "data: load, split, label, pack"),
    ("evil_moe.data.prepare", "encode_texts", "data: tokenise"),
    ("evil_moe.study.worker", "cached_data", "data: load, split, label, pack"),
    ("evil_moe.recipes.study_run", "prepare_run", "setup: model init, subsets"),
    ("evil_moe.recipes.study_run", "seen_tokens", "exposure count"),
    ("evil_moe.recipes.experiment", "train", "training steps"),
    ("evil_moe.train.loop", "mean_token_loss", "held-out retain loss at 80%"),
    ("evil_moe.recipes.experiment", "evaluate_losses", "eval: losses trained/ablated"),
    ("evil_moe.eval.specialization", "mean_ablation_matrix", "eval: mean-ablation matrix"),
    ("evil_moe.eval.specialization", "cancellation_ratio", "eval: cancellation ratio"),
    ("evil_moe.eval.specialization", "distinctive_losses", "eval: distinctive-token losses"),
    ("evil_moe.recipes.study_run", "group_gradient_norms", "gradient norms by group"),
    ("evil_moe.recipes.study_run", "gate_load", "gate load"),
    ("evil_moe.recipes.study_run", "finetune_curve", "relearning + retain fine-tuning"),
    ("evil_moe.eval.relearning", "mean_token_loss", "fine-tuning evals"),
    ("evil_moe.recipes.study_run", "amplifier_selection", "amplifier selection"),
)


class Timers:
    """Exclusive process-time per phase (nested phases are subtracted from outer ones)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self.stack: list[list[Any]] = []

    def wrap(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [phase, time.process_time(), 0.0]
            self.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                total = time.process_time() - frame[1]
                self.spent[phase] = self.spent.get(phase, 0.0) + total - frame[2]
                if self.stack:
                    self.stack[-1][2] += total

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="leakage: fine4 bilingual seed=0 recall=0.2")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # its lazy imports (once)
    imports = time.process_time() - _STARTED
    timers = Timers()
    for module, name, phase in PHASES:
        mod = importlib.import_module(module)
        setattr(mod, name, timers.wrap(getattr(mod, name), phase))
    spec, _ = load_spec("quick")
    try:
        run = find_run(spec, args.run)
    except StudyError as err:
        raise SystemExit(str(err)) from None
    task = study_task(spec, run)
    began = time.process_time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = execute_run(task)
    run_cpu = time.process_time() - began
    after = resource.getrusage(resource.RUSAGE_SELF)
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultStore.open(tmp, spec.study_id, "bench", spec.to_dict())
        t = time.process_time()
        store.put_run(run, result, result["wall_s"])
        timers.spent["store write"] = time.process_time() - t
        store.close()
    timers.spent["other (config, measurement glue)"] = run_cpu - sum(
        v for k, v in timers.spent.items() if k != "store write"
    )
    print(f"run: {args.run} (threads={args.threads})")
    print(f"{'process start: imports':40s} {imports:7.2f} s  (once per worker process)")
    total = sum(timers.spent.values())
    for phase, spent in sorted(timers.spent.items(), key=lambda kv: -kv[1]):
        print(f"{phase:40s} {spent:7.2f} s  {spent / total:6.1%}")
    user, system = after.ru_utime - usage.ru_utime, after.ru_stime - usage.ru_stime
    faults = after.ru_minflt - usage.ru_minflt
    print(f"run: user {user:.2f} s, system {system:.2f} s, {faults:,} minor page faults")
    print(f"run_cpu_s={run_cpu:.2f}")


if __name__ == "__main__":
    main()

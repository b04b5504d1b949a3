"""Does ``torch.compile`` pay for itself on a quick-preset study run? Measured, not guessed.

Times, in one single-threaded process (as a study worker runs), the training step
(forward, loss, backward) of a quick-preset run's own model and batches, eager and
compiled, and the compilation itself (the first compiled step, in process; inductor's
compile workers are set to one so that the process clock sees all of it). The same is done
for the plain GPT of the same dimensions, the upper bound (one graph, no routing). It
prints the graph breaks, whether the first step's compiled and eager losses are the same
bits, and how many steps the compilation takes to pay back (the run's own step count is
printed first).

    python bench/compile.py [--run "leakage: fine4 bilingual seed=0 recall=0.2"]

Last line: ``compiled_over_eager_step_time=VALUE`` (the routed run's step, compiled over
eager; below 1 is faster).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from evil_moe.data.batching import BatchIterator
from evil_moe.models.gpt import GPT, GPTConfig
from evil_moe.models.testbed import lm_loss
from evil_moe.routing.labels import Method
from evil_moe.study.runner import find_run
from evil_moe.study.spec import StudyError, load_spec
from evil_moe.train.memory import keep_heap
from evil_moe.train.setup import prepare_run
from evil_moe.train.step import total_steps

Step = Callable[[nn.Module, dict[str, Tensor]], Tensor]


def timed_steps(
    model: nn.Module, step: Step, batches: list[dict[str, Tensor]], warmup: int
) -> tuple[float, float, float]:
    """(first step's process seconds, median later step in ms, first step's loss)."""
    start = time.process_time()
    first = step(model, batches[0])
    first_s = time.process_time() - start
    times = []
    for i, batch in enumerate(batches[1:]):
        start = time.process_time()
        step(model, batch)
        if i >= warmup:
            times.append(time.process_time() - start)
    return first_s, statistics.median(times) * 1e3, float(first)


def compare(
    name: str, model: nn.Module, step: Step, batches: list, warmup: int, backend: str
) -> tuple[float, float]:
    """Eager and compiled timings of one model; returns (eager ms, compiled ms)."""
    compiled = torch.compile(copy.deepcopy(model), backend=backend)
    torch._dynamo.utils.counters.clear()
    _, eager_ms, eager_loss = timed_steps(model, step, batches, warmup)
    compile_s, compiled_ms, compiled_loss = timed_steps(compiled, step, batches, warmup)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    saved = eager_ms - compiled_ms
    payback = f"{compile_s * 1e3 / saved:.0f} steps" if saved > 0 else "never"
    print(
        f"{name}: eager {eager_ms:.1f} ms, compiled {compiled_ms:.1f} ms "
        f"(x{compiled_ms / eager_ms:.3f}); first compiled step {compile_s:.1f} s; "
        f"graph breaks {breaks}; first loss same bits: {eager_loss == compiled_loss}; "
        f"pays back after {payback}"
    )
    return eager_ms, compiled_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="leakage: fine4 bilingual seed=0 recall=0.2")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument(
        "--cache-dir", help="inductor's cache (default: a fresh one, so compilation is cold)"
    )
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    with tempfile.TemporaryDirectory() as fresh:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir or fresh
        measure(args)


def measure(args: argparse.Namespace) -> None:
    """Both comparisons, in this process."""
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph breaks are counted, not logged
    keep_heap()
    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1
    try:
        cfg = find_run(load_spec("quick")[0], args.run).config
    except StudyError as err:
        raise SystemExit(str(err)) from None
    run = prepare_run(cfg)
    model, t, mc = run.model, cfg.train, run.model.cfg
    semantics = Method(t.method).semantics
    it = iter(BatchIterator(run.train, t.batch_size, seed=t.seed))
    batches = [next(it) for _ in range(1 + args.warmup + args.steps)]
    print(
        f"run: {args.run}; d_model={mc.d_model} layers={mc.n_layer} vocab={mc.vocab_size} "
        f"tokens/step={t.batch_size * mc.seq_len}; {total_steps(cfg, len(run.train))} training steps; "
        f"backend={args.backend}, threads=1, process time"
    )

    def routed_step(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        tokens = batch["tokens"]
        logits = m(
            tokens[:, :-1], route=batch["route"], mode=batch.get("mode"), semantics=semantics
        )
        loss = lm_loss(logits, tokens[:, 1:])
        loss.backward()
        m.zero_grad(set_to_none=True)
        return loss.detach()

    def plain_step(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        tokens = batch["tokens"]
        loss = lm_loss(m(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        m.zero_grad(set_to_none=True)
        return loss.detach()

    torch.manual_seed(0)
    plain = GPT(GPTConfig(**{f.name: getattr(mc, f.name) for f in dataclasses.fields(GPTConfig)}))
    compare("plain GPT, same dimensions", plain, plain_step, batches, args.warmup, args.backend)
    model.train()
    eager_ms, compiled_ms = compare(
        "the run's routed model", model, routed_step, batches, args.warmup, args.backend
    )
    print(f"compiled_over_eager_step_time={compiled_ms / eager_ms:.3f}")


if __name__ == "__main__":
    main()

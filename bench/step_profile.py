"""Where one training step of a quick-preset study run goes: forward, loss, backward,
optimizer, measured without a profiler.

``torch.profiler`` adds a fixed cost to every op it records and slows memory-bound ops
(it reported the loss's ``log_softmax`` backward at 30 ms a call in a quick-preset step
whose whole loss, timed alone, takes about 6 ms), so this bench times the step's parts
with the process clock around the same calls the training step makes, over ``--steps``
steps of the run's own model and batches, and then times the step's output-head matmuls
and its loss alone on tensors of the same shapes. Single-threaded, as a study worker runs.

    python bench/step_profile.py [--run "leakage: fine4 bilingual seed=0 recall=0.2"]

Last line: ``step_ms=VALUE`` (the median step, CPU milliseconds).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from evil_moe.data.batching import BatchIterator
from evil_moe.models.testbed import lm_loss
from evil_moe.routing.labels import Method
from evil_moe.routing.optim import StepLedger, routed_step
from evil_moe.study.runner import find_run
from evil_moe.study.spec import StudyError, load_spec
from evil_moe.train.memory import keep_heap
from evil_moe.train.setup import prepare_run
from evil_moe.train.step import lr_at, make_optimizer

PARTS = ("forward", "loss", "backward", "ledger", "optimizer")


def clocked(fn: Callable[[], object], repeats: int = 20) -> float:
    """Median process time of ``fn`` in milliseconds (after two warm-up calls)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="leakage: fine4 bilingual seed=0 recall=0.2")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    keep_heap()
    torch.set_num_threads(1)
    try:
        cfg = find_run(load_spec("quick")[0], args.run).config
    except StudyError as err:
        raise SystemExit(str(err)) from None
    run = prepare_run(cfg)
    model, t = run.model, cfg.train
    semantics = Method(t.method).semantics
    optimizer = make_optimizer(model, cfg)
    ledger = StepLedger(model.parameter_groups(), semantics)
    batches = iter(BatchIterator(run.train, t.batch_size, seed=t.seed))
    spent: dict[str, list[float]] = {p: [] for p in PARTS}
    model.train()
    for step in range(args.warmup + args.steps):
        batch = next(batches)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg)
        tokens, route = batch["tokens"], batch["route"]
        marks = [time.process_time()]
        logits = model(tokens[:, :-1], route=route, mode=batch.get("mode"), semantics=semantics)
        marks.append(time.process_time())
        loss = lm_loss(logits, tokens[:, 1:])
        aux = model.aux_losses()
        total = loss + sum(aux.values()) if aux else loss
        marks.append(time.process_time())
        total.backward()
        marks.append(time.process_time())
        ledger.record(route)
        marks.append(time.process_time())
        routed_step(optimizer, ledger, t.grad_clip)
        marks.append(time.process_time())
        if step >= args.warmup:
            for part, a, b in zip(PARTS, marks, marks[1:], strict=False):
                spent[part].append((b - a) * 1e3)
    med = {p: statistics.median(v) for p, v in spent.items()}
    steps = [sum(v) for v in zip(*spent.values(), strict=True)]
    step_ms = statistics.median(steps)
    mc = model.cfg
    n = t.batch_size * mc.seq_len
    print(
        f"run: {args.run}; d_model={mc.d_model} layers={mc.n_layer} vocab={mc.vocab_size} "
        f"tokens/step={n} steps={args.steps} (threads=1, process time)"
    )
    for part in PARTS:
        print(f"{part:10s} {med[part]:7.2f} ms  {med[part] / step_ms:6.1%}")
    h = torch.randn(n, mc.d_model)
    w = torch.randn(mc.vocab_size, mc.d_model) * mc.init_std
    g = torch.randn(n, mc.vocab_size)
    targets = torch.randint(0, mc.vocab_size, (n,))
    head = clocked(lambda: h @ w.t()) + clocked(lambda: g @ w) + clocked(lambda: g.t() @ h)
    flops = 3 * 2 * n * mc.d_model * mc.vocab_size
    rate = flops / head / 1e6
    print(f"of which the output head's three matmuls alone: {head:.2f} ms ({rate:.1f} GFLOP/s)")

    def loss_alone() -> None:
        x = g.detach().requires_grad_(True)
        F.cross_entropy(x, targets).backward()

    loss_ms = clocked(loss_alone)
    print(f"of which the loss alone (log-softmax + NLL, both passes): {loss_ms:.2f} ms")
    rest = step_ms - head - loss_ms
    print(f"the rest (blocks, quarantine, embeddings, routing, optimizer): {rest:.2f} ms")
    print(f"step_ms={step_ms:.2f}")


if __name__ == "__main__":
    main()

"""Data-parallel scaling of the routed testbed step on this machine (CPU, gloo).

Runs the same global batch (default testbed, 32 x 128 tokens, K = 4 experts, a mix of
retain, forget and unlabeled sequences) as routed (SGTM) and dense (``none``) optimizer
steps, interleaved, in three set-ups, each started by ``torchrun``:

* 1 process, 1 thread;
* 2 processes (DDP over gloo), 1 thread each: each rank trains half of every batch;
* 1 process, 2 threads: the other way to use two cores.

It reports median step times, tokens/s of the global batch, the 2-process speed-up over
1 process (the data-parallel scaling of one more core, all-reduce over loopback
included), and the routed-over-dense step time under DDP (the cost of exact routing with
its one extra collective, the all-reduce of the step's route labels).

    python bench/ddp_scaling.py [--steps 12] [--batch 32]

Last line: ``ddp2_over_1_tokens_per_s=VALUE``. On a 2-core machine that also runs other
work the speed-up is bounded by 2 and lowered by whatever else holds the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from evil_moe.models.testbed import Testbed, TestbedConfig
from evil_moe.routing.optim import StepLedger, routed_step
from evil_moe.routing.routers import RouterConfig
from evil_moe.train.distributed import DataParallel, StepModel
from evil_moe.train.step import train_step

ROOT = Path(__file__).resolve().parents[1]


def worker(out: Path, steps: int, batch: int, threads: int) -> None:
    """One rank: interleaved dense and routed steps; rank 0 writes the median times."""
    torch.set_num_threads(threads)
    parallel = DataParallel.setup("cpu")
    cfg = TestbedConfig(n_experts=4, quarantine_width=64, router=RouterConfig(policy="all"))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=gen)
    route = torch.arange(batch).remainder(3).repeat_interleave(cfg.seq_len).view(batch, -1)
    setups = {}
    for name, semantics in (("dense", "none"), ("routed", "sgtm")):
        torch.manual_seed(0)
        model = Testbed(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        ledger = StepLedger(model.parameter_groups(), semantics)
        setups[name] = (StepModel(model, parallel.wrap(model), parallel), opt, ledger, semantics)
    times: dict[str, list[float]] = {"dense": [], "routed": []}
    for step in range(steps + 2):
        for name, (step_model, opt, ledger, semantics) in setups.items():
            began = time.perf_counter()
            part = parallel.shard({"tokens": tokens, "route": route})
            train_step(step_model, part, semantics, ledger)
            routed_step(opt, ledger, max_norm=1.0)
            if step >= 2:  # two warm-up steps
                times[name].append(time.perf_counter() - began)
    if parallel.is_main:
        medians = {k: statistics.median(v) for k, v in times.items()}
        (out / "times.json").write_text(json.dumps(medians | {"world": parallel.world}))
    parallel.close()


def measure(nproc: int, threads: int, steps: int, batch: int) -> dict[str, float]:
    """Median step times of one set-up, run under torchrun."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])
        )
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*launcher, f"--nproc_per_node={nproc}", __file__, "--worker", tmp]
        command += ["--steps", str(steps), "--batch", str(batch), "--threads", str(threads)]
        subprocess.run(command, env=env, check=True, capture_output=True)
        return json.loads((Path(tmp) / "times.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.steps, args.batch, args.threads)
        return
    tokens = args.batch * TestbedConfig().seq_len
    results = {
        "1proc_1thread": measure(1, 1, args.steps, args.batch),
        "2proc_1thread": measure(2, 1, args.steps, args.batch),
        "1proc_2threads": measure(1, 2, args.steps, args.batch),
    }
    print(
        f"cores={os.cpu_count()} global_batch={args.batch}x{TestbedConfig().seq_len} steps={args.steps}"
    )
    for name, t in results.items():
        for kind in ("dense", "routed"):
            print(f"{name}_{kind}_step_s={t[kind]:.4f}")
            print(f"{name}_{kind}_tokens_per_s={tokens / t[kind]:.0f}")
    one, two = results["1proc_1thread"], results["2proc_1thread"]
    print(f"threads2_over_1_tokens_per_s={one['routed'] / results['1proc_2threads']['routed']:.3f}")
    print(f"ddp_routed_over_dense_step_time={two['routed'] / two['dense']:.3f}")
    print(f"ddp2_over_1_tokens_per_s={one['routed'] / two['routed']:.3f}")


if __name__ == "__main__":
    main()

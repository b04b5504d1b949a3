"""Run by the DDP tests under ``torchrun`` (and as one plain process for the reference):
three routed optimizer steps on hand-made global batches, then every rank saves its
parameters, optimizer state and step reports to ``OUT/rank{r}.pt``.

    step 1: a mixed batch (every label): builds optimizer state
    step 2: a forget-only global batch: shared parameters must not move on any rank
    step 3: rank 0's rows all forget, rank 1's all retain: the shared group is trained by
            the global step, so every rank must step it (a rank deciding alone would not)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from evil_moe.routing.labels import RouteLabel
from evil_moe.routing.optim import StepLedger, routed_step
from evil_moe.train.config import load_config
from evil_moe.train.distributed import DataParallel, StepModel
from evil_moe.train.setup import prepare_run
from evil_moe.train.step import make_optimizer, train_step

TINY = [
    "model.d_model=16",
    "model.n_layer=1",
    "model.n_head=2",
    "model.seq_len=16",
    "model.mlp_width=32",
    "model.quarantine_width=8",
    "model.n_experts=2",
    "data.max_docs=40",
    "train.batch_size=4",
    "train.device=cpu",
]


def batches(tokens: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    B, L = 4, tokens.shape[1] - 1
    mixed = torch.tensor([0, 1, 2, 1]).repeat_interleave(L).reshape(B, L)
    forget = torch.full((B, L), int(RouteLabel.FORGET))
    split = torch.tensor([1, 1, 0, 0]).repeat_interleave(L).reshape(B, L)  # rows 0-1: rank 0
    return [
        {"tokens": tokens[i * B : (i + 1) * B], "route": route}
        for i, route in enumerate((mixed, forget, split))
    ]


def main(out: Path, local_decisions: bool = False) -> None:
    torch.set_num_threads(1)
    cfg = load_config(None, TINY)
    run = prepare_run(cfg)
    model = run.model
    parallel = DataParallel.setup("cpu")
    optimizer = make_optimizer(model, cfg)
    # local_decisions: each rank releases from its own labels (the bug the tests guard)
    ledger = StepLedger(model.parameter_groups(), "sgtm", data_parallel=not local_decisions)
    step_model = StepModel(model, parallel.wrap(model), parallel)
    reports, states = [], []
    for batch in batches(run.train.tokens):
        train_step(step_model, parallel.shard(batch), "sgtm", ledger)
        reports.append(routed_step(optimizer, ledger, max_norm=1.0))
        states.append(
            {
                "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "optim": {
                    n: {k: v.clone() for k, v in optimizer.state[p].items()}
                    for n, p in model.named_parameters()
                    if p in optimizer.state
                },
            }
        )
    parallel.close()
    torch.save(
        {"states": states, "reports": [(r.idle, r.grad_norm) for r in reports]},
        out / f"rank{parallel.rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), local_decisions=sys.argv[2:] == ["local"])

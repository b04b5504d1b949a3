"""Data-parallel training of the testbed with exact routing (``torchrun``).

    torchrun --standalone --nproc_per_node=2 -m evil_moe.cli.main train --out runs/x
    evil-moe train --nproc 2 --out runs/x           # the same, torchrun started for you

Every rank builds the same data and model (same seed) and draws the same *global* batch;
rank ``r`` trains on its contiguous share of the batch's rows (:meth:`DataParallel.shard`),
so each sequence keeps its per-token route labels and modes. The model is wrapped in
``DistributedDataParallel``; its communication hook sums each rank's gradient weighted
by the rank's share of the global batch's tokens, so the averaged gradient is exactly the
gradient of the global batch's mean token loss, also for an uneven last batch. After
``backward()`` every rank holds the same gradients; the step ledger all-reduces which
route labels the global step saw (:mod:`evil_moe.routing.distributed`) and every rank
releases the same groups, so a parameter that no token of the global step may train is
not moved on any rank, and per-group clipping sees global norms. Rank 0 alone writes
the run's outputs. See ``docs/scale.md`` for DDP's unused-parameter handling and
gradient buckets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from evil_moe.train.devices import autocast_dtype, resolve_device

__all__ = ["DataParallel", "StepModel", "launched_by_torchrun", "torchrun"]


def launched_by_torchrun() -> bool:
    """True in a process that ``torchrun`` (or another launcher) started as one of
    several ranks (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun(nproc: int, command: list[str]) -> int:
    """Run ``torchrun --standalone --nproc_per_node=NPROC COMMAND`` (``command`` as after
    ``python``, e.g. ``["-m", "evil_moe.cli.main", "train", ...]``) and return its exit
    status; a stop signal received meanwhile is passed on to it and waited for."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    process = subprocess.Popen([*launcher, f"--nproc_per_node={nproc}", *command])
    try:
        return process.wait()
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
        process.wait()
        raise


@dataclass
class _Weight:
    """The communication hook's state: this rank's share of the step's tokens."""

    share: float = 1.0
    group: Any = None


def _weighted_allreduce(state, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook (``dist.GradBucket`` -> ``Future[Tensor]``; DDP rejects any
    other annotation, so none is written): ``sum_r share_r * grad_r``. DDP's own hook
    divides by the world size instead, the same only when every rank has as many tokens."""
    tensor = bucket.buffer()
    tensor.mul_(state.share)
    work = dist.all_reduce(tensor, group=state.group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


@dataclass
class DataParallel:
    """One rank of a data-parallel run (``world == 1``: a single process, every method
    is then the identity and nothing is wrapped)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: the process group was started here (and is destroyed by :meth:`close`)
    owns_group: bool = False
    _weight: _Weight = field(default_factory=_Weight)

    @classmethod
    def setup(cls, device: str = "auto") -> DataParallel:
        """This process's place in the run: starts the process group when a launcher
        started several ranks (``gloo`` on CPUs, ``nccl`` on GPUs), else a world of one."""
        if not launched_by_torchrun() and not (dist.is_available() and dist.is_initialized()):
            return cls(device=resolve_device(device))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        resolved = resolve_device(device, local_rank=local)
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), resolved, owns)

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that writes outputs and prints."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` on the device, in ``DistributedDataParallel`` when ``world > 1``.

        Every testbed parameter takes part in every forward pass (a masked token gives a
        zero gradient, not a missing one), so ``find_unused_parameters`` stays off."""
        model.to(self.device)
        if self.world == 1:
            return model
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )
        ddp.register_comm_hook(self._weight, _weighted_allreduce)
        return ddp

    def shard(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's rows of a global batch, on the device; sets the communication
        hook's weight to this rank's share of the batch's rows.

        A rank left without rows (a last batch smaller than the world) trains on the
        global batch's first row with weight 0: it must still take part in the step's
        collectives, and contributes exactly nothing (the row's labels are among the
        global step's anyway)."""
        rows = next(iter(batch.values())).shape[0]
        if self.world == 1:
            return {k: v.to(self.device) for k, v in batch.items()}
        index = torch.tensor_split(torch.arange(rows), self.world)[self.rank]
        self._weight.share = len(index) / rows
        if len(index) == 0:
            index = torch.zeros(1, dtype=torch.long)
        return {k: v[index].to(self.device) for k, v in batch.items()}

    @property
    def has_rows(self) -> bool:
        """This rank's share of the current batch is not empty."""
        return self._weight.share > 0

    def mean(self, local: float) -> float:
        """The global batch's mean of a per-token mean computed on this rank's rows."""
        if self.world == 1:
            return local
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        value = torch.tensor([local * self._weight.share], dtype=torch.float64, device=device)
        dist.all_reduce(value)
        return float(value.item())

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """bf16 autocast on GPUs; nothing on CPUs (CPU results stay bitwise the same)."""
        dtype = autocast_dtype(self.device)
        if dtype is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=dtype):
                yield

    def close(self) -> None:
        """Destroy the process group if :meth:`setup` started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


class StepModel:
    """What the training step calls: the (possibly DDP-wrapped) forward under the
    device's autocast, and the model's auxiliary losses."""

    def __init__(self, model: nn.Module, forward: nn.Module, parallel: DataParallel):
        self.model, self.forward, self.parallel = model, forward, parallel

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        with self.parallel.forward_context():
            return self.forward(*args, **kwargs)

    def aux_losses(self) -> dict[str, Tensor]:
        return self.model.aux_losses()  # type: ignore[operator]

"""Route labels across data-parallel ranks: the one collective the routed step needs.

Under data parallelism (``torch.nn.parallel.DistributedDataParallel``, also through
``accelerate`` and the HF ``Trainer``) every rank ends ``backward()`` with the same,
all-reduced gradients, so every rank must also make the same release decision: a group
is released only when no token of the *global* step may train it. Each rank's
:class:`~evil_moe.routing.optim.StepLedger` has seen only its own micro-batches, so
before releasing it all-reduces which labels were seen (one ``MAX`` all-reduce of three
flags per optimizer step). Norms need no collective: the gradients a rank clips are
already the global ones, so per-group clipping uses global norms.

Nothing here starts a process group; it uses the one the launcher made (``torchrun``,
``accelerate launch``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from evil_moe.routing.labels import RouteLabel

__all__ = ["data_parallel_world", "global_route_labels"]


def data_parallel_world(group: Any = None) -> int:
    """World size of ``group`` (default: the default process group); 1 when
    ``torch.distributed`` is unavailable or not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _collective_device(group: Any) -> torch.device:
    """Where a tensor for a collective of ``group`` must live (NCCL: the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_route_labels(seen: set[RouteLabel], group: Any = None) -> set[RouteLabel]:
    """The union of ``seen`` over every rank of ``group`` (all ranks must call it)."""
    if data_parallel_world(group) == 1:
        return set(seen)
    flags = torch.zeros(len(RouteLabel), dtype=torch.int32, device=_collective_device(group))
    for label in seen:
        flags[int(label)] = 1
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return {RouteLabel(i) for i, flag in enumerate(flags.tolist()) if flag}

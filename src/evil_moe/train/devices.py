"""Where a run computes: ``train.device = auto | cpu | cuda`` and the autocast it uses.

``auto`` is the GPU when one is visible, else the CPU. On a GPU the forward pass runs
under bf16 autocast (parameters, gradients and optimizer state stay fp32; the routed ops
of :mod:`evil_moe.routing.functional` compute in the autocast dtype and return fp32
gradients). On a CPU nothing changes: no autocast, so CPU results are bitwise those of a
run without the setting.
"""

from __future__ import annotations

import torch

from evil_moe.train.config import DEVICES, ConfigError

__all__ = ["autocast_dtype", "resolve_device"]


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The ``torch.device`` of a ``train.device`` setting (``cuda``: this rank's GPU);
    :class:`~evil_moe.train.config.ConfigError` for ``cuda`` without a GPU."""
    if name not in DEVICES:
        raise ConfigError(f"train.device: must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda, but torch sees no GPU (use auto or cpu)")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that support it (fp16 would need a gradient scaler); ``None`` on CPUs."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None

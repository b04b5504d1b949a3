"""Resumable checkpoints of a training run (model and optimizer state).

The atomic file writes themselves are :mod:`evil_moe.io`; a checkpoint is a per-step safetensors file plus the JSON that names it, written in that
order, so a kill at any moment leaves a JSON that names a complete tensor file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from evil_moe.io import read_tensors, write_json, write_tensors
from evil_moe.train.config import ConfigError

__all__ = ["load_checkpoint", "remove_checkpoints", "save_checkpoint"]

CHECKPOINT_JSON = "checkpoint.json"


def save_checkpoint(
    directory: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Model and optimizer state after ``step`` steps, as safetensors + JSON."""
    directory = Path(directory)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    index = {}
    for pid, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                index.setdefault(str(pid), {})[key] = value
    # Tensors first under a per-step name, then the JSON that points at them: a kill at
    # any moment leaves a JSON that names a complete tensor file.
    name = f"checkpoint-{step:08d}.safetensors"
    write_tensors(directory / name, tensors)
    write_json(
        directory / CHECKPOINT_JSON,
        {"step": step, "file": name, "param_groups": opt["param_groups"], "scalar_state": index},
    )
    for old in directory.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(
    directory: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> int | None:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its step or None."""
    directory = Path(directory)
    meta_path = directory / CHECKPOINT_JSON
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    tensors = read_tensors(directory / meta["file"])
    saved = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    own = model.state_dict()
    if set(saved) != set(own):
        missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        raise ConfigError(
            f"{directory}: the checkpoint does not match this model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): another model or an older evil_moe wrote it; "
            "resume it with the version that wrote it, or start again in a fresh --out"
        )
    model.load_state_dict(saved)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, scalars in meta["scalar_state"].items():
        state.setdefault(int(pid), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"])


def remove_checkpoints(directory: str | Path) -> None:
    """Delete a run's checkpoints (once its final outputs are written)."""
    directory = Path(directory)
    for stale in (*directory.glob("checkpoint-*.safetensors"), directory / CHECKPOINT_JSON):
        stale.unlink(missing_ok=True)

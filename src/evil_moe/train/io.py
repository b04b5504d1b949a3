"""Atomic file writes and resumable checkpoints.

Every file is written to a temporary name in the same directory, flushed, fsynced and
renamed over the target, so a killed process leaves either the old file or the new one,
never half of one. Weights use safetensors; other state is JSON. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file renamed over it)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(Path(path), write)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as pretty JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")

    _atomic(Path(path), write)


def write_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """Save tensors as safetensors, atomically (shared storage is cloned apart)."""
    plain = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    _atomic(Path(path), lambda tmp: save_file(plain, tmp, metadata=meta))


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it (a torn last line is skipped by readers)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace a JSONL file with ``records``, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    _atomic(Path(path), write)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL log, ignoring a torn final line left by a killed writer."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


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
        directory / "checkpoint.json",
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
    meta_path = directory / "checkpoint.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    tensors = read_tensors(directory / meta["file"])
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, scalars in meta["scalar_state"].items():
        state.setdefault(int(pid), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"])

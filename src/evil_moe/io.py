"""Atomic file writes: the one helper every layer uses.

Every file is written to a temporary name in the same directory, flushed, fsynced and
renamed (or, with ``replace=False``, linked) onto the target, so a killed process leaves
either the old file or the new one, never half of one. Weights use safetensors; other
state is JSON. Nothing is unpickled. Imports nothing from evil_moe.
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

__all__ = [
    "append_jsonl",
    "atomic_write",
    "read_jsonl",
    "read_tensors",
    "remove_temporaries",
    "write_bytes",
    "write_json",
    "write_jsonl",
    "write_tensors",
]

#: the suffix of atomic_write's temporary files
TEMP_SUFFIX = ".tmp"
#: the process umask, read once: temporary files get the mode ``open()`` would give
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[str], None], replace: bool = True) -> bool:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, which is
    fsynced and then renamed over ``path`` (``replace=True``) or linked to ``path`` only if
    no file is there yet (``replace=False``; a file created meanwhile by another process is
    kept). Returns whether ``path`` now holds what ``write`` wrote."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if the file exists
        except FileExistsError:
            return False
        return True
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def remove_temporaries(directory: str | Path) -> None:
    """Delete the temporary files :func:`atomic_write` left in ``directory`` (and below)
    when a signal stopped it between creating one and its own clean-up. Call it only
    when no writer is active there (a run that has stopped)."""
    directory = Path(directory)
    if directory.is_dir():
        for stale in directory.rglob(f".*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file renamed over it)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def write_json(path: str | Path, data: Any, sort_keys: bool = False) -> None:
    """Write ``data`` as pretty JSON (2-space indent, final newline), atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=sort_keys)
            f.write("\n")

    atomic_write(path, write)


def write_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """Save tensors as safetensors on the CPU, atomically (shared storage is cloned apart)."""
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=meta))


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, on the CPU."""
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

    atomic_write(path, write)


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

"""Finding things in a model's module tree: the modules that
:func:`~evil_moe.models.inject.inject` wraps, name patterns, widths, replacing a module."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

from evil_moe.models.adapters import Wrapper, is_linear, linear_dims

__all__ = [
    "hidden_size",
    "matches_any",
    "mlp_width",
    "module_dims",
    "output_embeddings",
    "resolve_targets",
    "set_submodule",
]


def resolve_targets(
    model: nn.Module, target_modules: str | Sequence[str] | None, kind: str
) -> list[str]:
    """Full names of the modules :func:`~evil_moe.models.inject.inject` wraps."""
    modules = dict(model.named_modules())
    if target_modules is None:
        if kind == "lora":
            out_emb = output_embeddings(model)
            names = [n for n, m in modules.items() if is_linear(m) and m is not out_emb]
        else:
            names = [n for n in modules if n == "mlp" or n.endswith(".mlp")]
    elif isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        names = [n for n in modules if n and pattern.fullmatch(n)]
    else:
        wanted = list(target_modules)
        names = [n for n in modules if n and any(n == t or n.endswith("." + t) for t in wanted)]
    if not names:
        raise ValueError(
            f"no module of {type(model).__name__} matches target_modules={target_modules!r}"
        )
    for n in names:
        if any(n.startswith(o + ".") for o in names if o != n):
            raise ValueError(f"target {n!r} lies inside another target; pick one level")
        m = modules[n]
        if isinstance(m, Wrapper):
            raise ValueError(f"{n} is already wrapped")
        if kind == "lora":
            try:
                linear_dims(m)
            except ValueError as err:
                raise ValueError(f"target {n}: kind='lora' needs linear layers; {err}") from err
    return names


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether a module name matches a glob pattern, a full name or a name suffix."""
    return any(
        fnmatch.fnmatchcase(name, p) or name == p or name.endswith("." + p) for p in patterns
    )


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (not the model itself) by ``module``."""
    if not name:
        raise ValueError("cannot wrap the model itself; target a submodule")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's output embedding (LM head), if it says which it is."""
    getter = getattr(model, "get_output_embeddings", None)
    if getter is None:
        return None
    try:
        return getter()
    except (AttributeError, NotImplementedError):
        return None


def hidden_size(model: nn.Module) -> int | None:
    """The model width from its config (``hidden_size``, ``n_embd`` or ``d_model``)."""
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


def mlp_width(module: nn.Module, d_model: int | None, name: str) -> int:
    """Model width at an MLP block's input/output, from its first and last linear layer."""
    linears = [m for m in module.modules() if is_linear(m)]
    if linears:
        d_in, d_out = linear_dims(linears[0])[0], linear_dims(linears[-1])[1]
        if d_in != d_out:
            raise ValueError(f"{name}: MLP input width {d_in} != output width {d_out}")
        return d_in
    if d_model is None:
        raise ValueError(f"{name}: cannot infer the MLP's width (no linear layers, no config)")
    return d_model


def module_dims(module: nn.Module, name: str) -> tuple[int, int]:
    """``(in, out)`` widths of a linear layer, or of an MLP block (equal)."""
    if is_linear(module) or hasattr(module, "in_features"):
        return linear_dims(module)
    return (d := mlp_width(module, None, name)), d

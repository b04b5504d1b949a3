"""Saving and loading an injected quarantine: the adapters alone, never the base weights.

``quarantine_model.safetensors`` holds the quarantine, shared-expert and router tensors;
``quarantine_config.json`` what :func:`~evil_moe.models.inject.inject` did and a
description of the base model, checked on loading. Both are written atomically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from evil_moe.io import read_tensors, write_bytes, write_tensors
from evil_moe.models.adapters import QuarantineLayer
from evil_moe.models.handle import QuarantineConfig, QuarantineHandle
from evil_moe.models.inject import inject
from evil_moe.models.targets import module_dims
from evil_moe.routing.routers import RouterConfig

__all__ = [
    "CONFIG_NAME",
    "FORMAT",
    "WEIGHTS_NAME",
    "check_compatible",
    "describe_base",
    "load_quarantine",
    "save_quarantine",
]

CONFIG_NAME = "quarantine_config.json"
WEIGHTS_NAME = "quarantine_model.safetensors"
FORMAT = "evil_moe.quarantine/1"
_CONFIG_SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
)


def save_quarantine(handle: QuarantineHandle, path: str | Path) -> Path:
    """Write ``handle``'s adapters to the directory ``path`` (see
    :meth:`QuarantineHandle.save <evil_moe.models.handle.QuarantineHandle.save>`)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_tensors(path / WEIGHTS_NAME, handle.adapter_state_dict(), {"format": FORMAT})
    meta = {
        "format": FORMAT,
        "config": handle.config.to_dict(),
        "base_model": describe_base(handle.model, handle.layers),
    }
    write_bytes(path / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True).encode("utf-8"))
    return path


def load_quarantine(
    model: nn.Module, path: str | Path, router: RouterConfig | str | None = None
) -> QuarantineHandle:
    """Inject the saved quarantine into ``model`` and load its weights.

    Raises ``ValueError`` naming the module and the shapes when ``model`` does not have
    the architecture the adapters were saved from. ``router`` overrides the saved one.
    """
    path = Path(path)
    meta = json.loads((path / CONFIG_NAME).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_NAME} is not an evil_moe quarantine config")
    config = QuarantineConfig.from_dict(meta["config"])
    check_compatible(model, meta["base_model"])
    handle = inject(
        model,
        target_modules=_exact(config.target_modules),
        n_quarantine=config.n_quarantine,
        shared_expert=0 if config.shared_merged else config.shared_expert,
        kind=config.kind,
        rank=config.rank,
        router=router if router is not None else config.router,
        semantics=config.semantics,
        train_base=config.train_base,
        activation=config.activation,
        init_std=config.init_std,
        unrouted=config.unrouted,
        gate=config.gate,
        shared_expert_open=config.shared_expert_open,
        quarantine_heads=config.quarantine_heads,
    )
    handle.config.shared_expert = config.shared_expert
    handle.config.shared_merged = config.shared_merged
    tensors = read_tensors(path / WEIGHTS_NAME)
    if router is not None:  # a different router has different buffers: keep the new ones
        own = handle.adapter_state_dict()
        tensors = {k: v for k, v in tensors.items() if ".router." not in k}
        tensors.update({k: v for k, v in own.items() if ".router." in k})
    try:
        handle.load_adapter_state(tensors)
    except ValueError:
        handle.unload()
        raise
    return handle


def _exact(names: Sequence[str]) -> str:
    return "|".join(re.escape(n) for n in names)


def check_compatible(model: nn.Module, base: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``model`` matches the saved base-model description."""
    cls = type(model).__name__
    if base.get("class") and base["class"] != cls:
        raise ValueError(
            f"quarantine adapters were saved for {base['class']} but the model is {cls}"
        )
    modules = dict(model.named_modules())
    specs = base.get("modules", {})
    order = [n for n in modules if n in specs] + [n for n in specs if n not in modules]
    for name in order:
        spec, module = specs[name], modules.get(name)
        if module is None:
            raise ValueError(
                f"module {name!r} (saved with in={spec['in']}, out={spec['out']}) "
                f"does not exist in {cls}"
            )
        try:
            d_in, d_out = module_dims(module, name)
        except ValueError as err:
            raise ValueError(f"module {name!r}: {err}") from err
        if (d_in, d_out) != (spec["in"], spec["out"]):
            raise ValueError(
                f"module {name!r}: adapters were saved for in={spec['in']}, out={spec['out']} "
                f"but the model has in={d_in}, out={d_out}"
            )


def describe_base(model: nn.Module, layers: Mapping[str, QuarantineLayer]) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    shapes = {}
    if cfg is not None:
        for key in _CONFIG_SHAPE_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int):
                shapes[key] = value
    return {
        "class": type(model).__name__,
        "config": shapes,
        "modules": {
            n: {"type": type(m.base_layer).__name__, "in": m.d_in, "out": m.d_out}
            for n, m in layers.items()
        },
    }

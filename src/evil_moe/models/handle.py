"""The handle of an injected quarantine: inspect, route, switch, ablate, unload, save.

:func:`~evil_moe.models.inject.inject` returns a :class:`QuarantineHandle`;
:func:`get_handle` finds it again from the model, and :func:`route_labels` routes every
forward pass inside a block.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from evil_moe.models.adapters import QuarantineLayer, QuarantineLinear, RoutingState, Wrapper
from evil_moe.models.heads import QuarantineHeads
from evil_moe.models.hooks import detach_state
from evil_moe.models.targets import matches_any, set_submodule
from evil_moe.modules.ablation import ablate as _ablate
from evil_moe.modules.ablation import ablated as _ablated
from evil_moe.modules.ablation import parameter_groups
from evil_moe.modules.ablation import quarantine_parameters as _quarantine_parameters
from evil_moe.modules.experts import GateConfig
from evil_moe.routing.optim import ParameterGroups, StepLedger
from evil_moe.routing.routers import BackwardRouter, RouterConfig

__all__ = ["HANDLE_ATTR", "QuarantineConfig", "QuarantineHandle", "get_handle", "route_labels"]

#: the attribute of an injected model that holds its handle
HANDLE_ATTR = "_evil_moe_quarantine"


@dataclass
class QuarantineConfig:
    """What :func:`inject` did; saved as JSON next to the adapter weights."""

    kind: str = "lora"
    n_quarantine: int = 1
    #: LoRA rank (``kind="lora"``) or MLP hidden width (``kind="mlp"``) of each expert
    rank: int = 8
    #: rank / width of the shared always-on expert (0 = none)
    shared_expert: int = 0
    #: resolved module names that were wrapped
    target_modules: list[str] = field(default_factory=list)
    router: RouterConfig | None = None
    semantics: str = "sgtm"
    train_base: bool = False
    #: activation of MLP experts (LoRA experts are linear)
    activation: str = "gelu"
    init_std: float | None = None
    #: module name patterns whose parameters every token trains (with ``train_base``)
    unrouted: list[str] = field(default_factory=list)
    #: the shared expert has been merged into the base weights
    shared_merged: bool = False
    #: learned soft gate over the experts (``kind="mlp"``), or ``None``
    gate: GateConfig | None = None
    #: every token, forget tokens included, trains and sees the shared expert
    shared_expert_open: bool = False
    #: quarantine attention heads per attention module (``None``: attention not wrapped)
    quarantine_heads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["router"] = None if self.router is None else dataclasses.asdict(self.router)
        out["gate"] = None if self.gate is None else dataclasses.asdict(self.gate)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuarantineConfig:
        data = dict(data)
        router, gate = data.pop("router", None), data.pop("gate", None)
        cfg = _known_fields(cls, data)
        cfg.router = None if router is None else _known_fields(RouterConfig, router)
        cfg.gate = None if gate is None else _known_fields(GateConfig, gate)
        return cfg


def _known_fields(cls: type, data: Mapping[str, Any]) -> Any:
    """``cls`` built from the keys of ``data`` it knows (later versions may add others)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


class QuarantineHandle:
    """Controls the quarantine bank injected into one model (returned by :func:`inject`)."""

    def __init__(self, model: nn.Module, config: QuarantineConfig, state: RoutingState):
        self.model = model
        self.config = config
        self.state = state
        self._requires_grad: dict[str, bool] = {}
        #: the handles that hook registration returned (removed by :meth:`unload`)
        self._hooks: list[RemovableHandle] = []
        self._unloaded = False

    # -- inspection ------------------------------------------------------------------
    @property
    def layers(self) -> dict[str, QuarantineLayer]:
        """The quarantine wrappers by (original) module name."""
        self._check_live()
        return {n: m for n, m in self.model.named_modules() if isinstance(m, QuarantineLayer)}

    @property
    def heads(self) -> dict[str, QuarantineHeads]:
        """The quarantine-heads wrappers of attention modules by (original) module name."""
        self._check_live()
        return {n: m for n, m in self.model.named_modules() if isinstance(m, QuarantineHeads)}

    @property
    def routers(self) -> dict[str, BackwardRouter]:
        """The backward routers by layer name (empty with the ``all`` policy)."""
        return {n: m.router for n, m in self.layers.items() if m.router is not None}

    def quarantine_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters removed at deployment, by full name."""
        return _quarantine_parameters(self.model)

    def parameter_groups(self) -> ParameterGroups:
        """Shared (routed / open) and quarantine parameters, for a ledger or clipping."""
        open_names = set()
        for mname, module in self.model.named_modules():
            if not self.config.unrouted or not matches_any(mname, self.config.unrouted):
                continue
            if isinstance(module, QuarantineLinear):  # its base weight is the unrouted part
                mname, module = f"{mname}.base_layer", module.base_layer
            elif isinstance(module, Wrapper):
                continue
            for p, _ in module.named_parameters(recurse=False):
                open_names.add(f"{mname}.{p}" if mname else p)
        if not self.config.train_base:
            open_names.clear()  # the base is frozen: nothing is open
        if self.config.shared_expert_open:
            for lname, layer in self.layers.items():
                for p, _ in layer.shared.named_parameters() if layer.shared is not None else ():
                    open_names.add(f"{lname}.shared.{p}")
        return parameter_groups(self.model, open_names)

    def aux_losses(self) -> dict[str, Tensor]:
        """The soft gates' auxiliary losses of the last forward pass, summed over layers."""
        out: dict[str, Tensor] = {}
        for layer in self.layers.values():
            for name, value in layer.gate.aux.items() if layer.gate is not None else ():
                out[name] = out[name] + value if name in out else value
        return out

    def ledger(self) -> StepLedger:
        """A :class:`~evil_moe.routing.optim.StepLedger` over this model's groups."""
        return StepLedger(self.parameter_groups(), self.config.semantics)

    def num_parameters(self) -> dict[str, int]:
        """Counts: trainable, quarantine, shared expert, total."""
        quarantine = sum(p.numel() for p in self.quarantine_parameters().values())
        shared = sum(
            p.numel()
            for m in self.layers.values()
            if m.shared is not None
            for p in m.shared.parameters()
        )
        return {
            "total": sum(p.numel() for p in self.model.parameters()),
            "trainable": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "quarantine": quarantine,
            "shared_expert": shared,
        }

    # -- routing ---------------------------------------------------------------------
    def route_labels(self, labels: Any, modes: Any = None) -> contextlib.AbstractContextManager:
        """Context manager: route every forward pass inside it by ``labels``."""
        return _route_context(self, labels, modes)

    # -- forward switches ------------------------------------------------------------
    def set_enabled(self, enabled: bool) -> None:
        """Turn all adapters (shared expert and quarantine) on or off (base model only)."""
        self._check_live()
        self.state.enabled = bool(enabled)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """The base model alone inside the block."""
        previous = self.state.enabled
        self.set_enabled(False)
        try:
            yield self.model
        finally:
            self.state.enabled = previous

    def set_scale(self, scale: float) -> None:
        """Multiply every quarantine output by ``scale`` (1 = trained, 0 = ablated)."""
        self._check_live()
        self.state.scale = float(scale)

    @contextlib.contextmanager
    def scaled(self, scale: float) -> Iterator[nn.Module]:
        """Forget-scale sweep: quarantine outputs times ``scale`` inside the block."""
        previous = self.state.scale
        self.set_scale(scale)
        try:
            yield self.model
        finally:
            self.state.scale = previous

    # -- ablation --------------------------------------------------------------------
    def ablate(
        self,
        experts: Sequence[int] | None = None,
        mode: str = "zero",
        seed: int = 0,
        freeze: bool = True,
    ) -> None:
        """Permanently zero or re-initialise quarantine experts (all, or a subset)."""
        self._check_live()
        _ablate(self.model, experts=experts, mode=mode, seed=seed, freeze=freeze)

    def ablated(
        self, experts: Sequence[int] | None = None, mode: str = "zero", seed: int = 0
    ) -> contextlib.AbstractContextManager:
        """Context manager: quarantine experts removed, restored exactly on exit."""
        self._check_live()
        return _ablated(self.model, experts=experts, mode=mode, seed=seed)

    # -- deployment ------------------------------------------------------------------
    def merge_shared(self) -> None:
        """Add each shared LoRA into its base weight and drop it (``kind="lora"`` only)."""
        self._check_live()
        if self.config.kind != "lora":
            raise ValueError(
                "merge_shared needs kind='lora': an MLP shared expert cannot be merged"
            )
        for layer in self.layers.values():
            assert isinstance(layer, QuarantineLinear)
            layer.merge_shared()
        if self.config.shared_expert:
            self.config.shared_merged = True

    def unload(self) -> nn.Module:
        """Remove every wrapper and hook; the model gets its original modules back.

        The quarantine (and an unmerged shared expert) is discarded; call
        :meth:`merge_shared` first to keep the shared LoRA.
        """
        self._check_live()
        wrappers = [(n, m) for n, m in self.model.named_modules() if isinstance(m, Wrapper)]
        for name, module in sorted(wrappers, key=lambda nm: -nm[0].count(".")):
            set_submodule(self.model, name, module.base_layer)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module in self.model.modules():
            detach_state(module)
        for name, p in self.model.named_parameters():
            if name in self._requires_grad:
                p.requires_grad_(self._requires_grad[name])
        if getattr(self.model, HANDLE_ATTR, None) is self:
            delattr(self.model, HANDLE_ATTR)
        self._unloaded = True
        return self.model

    # -- persistence -----------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Quarantine, shared-expert and router tensors by full name (no base weights)."""
        out: dict[str, Tensor] = {}
        adapters: dict[str, nn.Module] = {**self.layers, **self.heads}
        for name, layer in adapters.items():
            for key, value in layer.state_dict().items():
                if not key.startswith("base_layer."):
                    out[f"{name}.{key}"] = value
        return out

    def save(self, path: str | Path) -> Path:
        """Write the adapters alone: ``quarantine_model.safetensors`` + ``quarantine_config.json``
        (atomically). Base weights are not saved; with ``train_base=True`` save the base
        model too."""
        from evil_moe.models.persistence import save_quarantine

        return save_quarantine(self, path)

    def load_adapter_state(self, tensors: Mapping[str, Tensor]) -> None:
        """Copy saved adapter tensors in (names and shapes must match exactly)."""
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"adapter tensors do not match the injected layers: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        for key, value in own.items():
            if tuple(value.shape) != tuple(tensors[key].shape):
                raise ValueError(
                    f"{key}: saved shape {tuple(tensors[key].shape)} != model {tuple(value.shape)}"
                )
        with torch.no_grad():
            for key, value in own.items():
                value.copy_(tensors[key].to(device=value.device, dtype=value.dtype))

    def _check_live(self) -> None:
        if self._unloaded:
            raise RuntimeError("this quarantine handle was unloaded")


def get_handle(model: nn.Module | QuarantineHandle) -> QuarantineHandle:
    """The handle of an injected model (also found through wrappers such as DDP)."""
    if isinstance(model, QuarantineHandle):
        return model
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is None:
        for module in model.modules():
            handle = getattr(module, HANDLE_ATTR, None)
            if handle is not None:
                break
    if handle is None:
        raise ValueError(f"{type(model).__name__} has no quarantine experts; call inject() first")
    return handle


def route_labels(
    model: nn.Module | QuarantineHandle, labels: Any, modes: Any = None
) -> contextlib.AbstractContextManager:
    """Route every forward pass of ``model`` inside the block by ``labels``.

    ``labels``: :class:`~evil_moe.routing.labels.RouteLabel` codes (or names) per sequence
    ``[B]`` or per token ``[B, T]``; ``modes``: optional forget mode per sequence / token for
    the routers' statistics. The plan of the last forward pass stays set after the block
    (until the next forward), so ``loss.backward()`` may run outside it.
    """
    return _route_context(get_handle(model), labels, modes)


@contextlib.contextmanager
def _route_context(handle: QuarantineHandle, labels: Any, modes: Any) -> Iterator[None]:
    handle._check_live()
    entry = (labels, modes)
    handle.state.pending.append(entry)
    try:
        yield
    finally:
        handle.state.pending.pop()

"""Quarantine experts on Hugging Face models: inject, route, ablate, save and load.

    handle = inject(model, n_quarantine=4, rank=8, shared_expert=8, router="topk")
    with route_labels(model, batch_route):          # [B] per sequence or [B, T] per token
        loss = model(**batch).loss
    loss.backward()
    # or: model(**batch, route_labels=batch_route)  (a forward pre-hook consumes the key)
    with handle.ablated():                           # deployment view
        ...
    handle.save("quarantine/"); load_quarantine(fresh_model, "quarantine/")

The wrappers (:mod:`evil_moe.models.adapters`) use the same components as the testbed:
``FusedExperts`` for the K quarantine experts, ``BackwardRouter`` for backward routing among
them, ``routed_linear`` / ``mask_cotangent`` for exact per-token SGTM and gradient-routing
masks, ``modules.ablation`` for ablation. Trainer integration: :class:`RouteLabelCollator`
plus :class:`RoutedTrainerMixin` (``RoutedTrainer`` = the mixin on ``transformers.Trainer``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from evil_moe.models.adapters import (
    HF_SEMANTICS,
    STATE_ATTR,
    EmbeddingHook,
    PerTokenHook,
    QuarantineLayer,
    QuarantineLinear,
    QuarantineMLP,
    RoutedBaseLinear,
    RoutePreHook,
    RoutingState,
    _Wrapper,
    is_linear,
    linear_dims,
    remove_route_hooks,
)
from evil_moe.modules.ablation import ablate as _ablate
from evil_moe.modules.ablation import ablated as _ablated
from evil_moe.modules.ablation import parameter_groups
from evil_moe.modules.ablation import quarantine_parameters as _quarantine_parameters
from evil_moe.modules.experts import ACTIVATIONS
from evil_moe.routing.labels import Method, RouteLabel, parse_route_labels
from evil_moe.routing.optim import ParameterGroups, StepLedger, StepReport
from evil_moe.routing.routers import BackwardRouter, RouterConfig

__all__ = [
    "CONFIG_NAME",
    "KINDS",
    "ROUTE_KEYS",
    "WEIGHTS_NAME",
    "QuarantineConfig",
    "QuarantineHandle",
    "RouteLabelCollator",
    "RoutedTrainerMixin",
    "get_handle",
    "inject",
    "load_quarantine",
    "route_labels",
]

KINDS = ("lora", "mlp")
#: Batch keys consumed by the forward pre-hook (never seen by the HF forward).
ROUTE_KEYS = ("route_labels", "route_modes")
CONFIG_NAME = "quarantine_config.json"
WEIGHTS_NAME = "quarantine_model.safetensors"
FORMAT = "evil_moe.quarantine/1"
_ATTR = "_evil_moe_quarantine"
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

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["router"] = None if self.router is None else dataclasses.asdict(self.router)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuarantineConfig:
        data = dict(data)
        router = data.pop("router", None)
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in known})
        if router is not None:
            fields = {f.name for f in dataclasses.fields(RouterConfig)}
            router = RouterConfig(**{k: v for k, v in router.items() if k in fields})
        cfg.router = router
        return cfg


class QuarantineHandle:
    """Controls the quarantine bank injected into one model (returned by :func:`inject`)."""

    def __init__(self, model: nn.Module, config: QuarantineConfig, state: RoutingState):
        self.model = model
        self.config = config
        self.state = state
        self._requires_grad: dict[str, bool] = {}
        self._unloaded = False

    # -- inspection ------------------------------------------------------------------
    @property
    def layers(self) -> dict[str, QuarantineLayer]:
        """The quarantine wrappers by (original) module name."""
        self._check_live()
        return {n: m for n, m in self.model.named_modules() if isinstance(m, QuarantineLayer)}

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
            if not self.config.unrouted or not _matches_any(mname, self.config.unrouted):
                continue
            if isinstance(module, QuarantineLinear):  # its base weight is the unrouted part
                mname, module = f"{mname}.base_layer", module.base_layer
            elif isinstance(module, _Wrapper):
                continue
            for p, _ in module.named_parameters(recurse=False):
                open_names.add(f"{mname}.{p}" if mname else p)
        if not self.config.train_base:
            open_names.clear()  # the base is frozen: nothing is open
        return parameter_groups(self.model, open_names)

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
        wrappers = [(n, m) for n, m in self.model.named_modules() if isinstance(m, _Wrapper)]
        for name, module in sorted(wrappers, key=lambda nm: -nm[0].count(".")):
            _set_submodule(self.model, name, module.base_layer)
        for module in self.model.modules():
            remove_route_hooks(module)
        for name, p in self.model.named_parameters():
            if name in self._requires_grad:
                p.requires_grad_(self._requires_grad[name])
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)
        self._unloaded = True
        return self.model

    # -- persistence -----------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Quarantine, shared-expert and router tensors by full name (no base weights)."""
        out: dict[str, Tensor] = {}
        for name, layer in self.layers.items():
            for key, value in layer.state_dict().items():
                if not key.startswith("base_layer."):
                    out[f"{name}.{key}"] = value
        return out

    def save(self, path: str | Path) -> Path:
        """Write the adapters alone: ``quarantine_model.safetensors`` + ``quarantine_config.json``.

        Base weights are not saved; with ``train_base=True`` save the base model too.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "config": self.config.to_dict(),
            "base_model": _describe_base(self.model, self.layers),
        }
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return path

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


# ----------------------------------------------------------------------------- inject


def inject(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    n_quarantine: int = 1,
    shared_expert: int | bool = 0,
    kind: str = "lora",
    rank: int = 8,
    router: RouterConfig | str | None = None,
    semantics: Method | str = "sgtm",
    train_base: bool = False,
    activation: str = "gelu",
    init_std: float | None = None,
    unrouted: Sequence[str] = (),
) -> QuarantineHandle:
    """Add a quarantine bank of ``n_quarantine`` experts to ``model`` in place.

    ``kind="lora"`` wraps the target linear layers (``nn.Linear`` or GPT-2 ``Conv1D``;
    default: every linear layer but the output embedding) with K LoRA experts of rank
    ``rank``; ``kind="mlp"`` adds K parallel MLP experts of width ``rank`` next to the
    target MLP blocks (default: modules named ``mlp``). ``target_modules``: a list of
    names or name suffixes, or one regex matched against full names (as in PEFT).
    ``shared_expert``: rank / width of an always-on shared expert (``True`` = ``rank``).
    ``router``: a :class:`RouterConfig` or a policy name (``all``, ``topk``, ...).
    ``train_base``: ``False`` freezes the base; ``True`` trains it, every base parameter
    being a routed shared parameter (linear layers via ``routed_linear``, embeddings via
    cotangent masks, norms via per-token recomputation) unless its module matches a
    pattern in ``unrouted``. Outputs are unchanged at initialisation.
    """
    if getattr(model, _ATTR, None) is not None:
        raise ValueError("model already has quarantine experts; unload() them first")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    if semantics not in HF_SEMANTICS:
        names = [m.value for m in HF_SEMANTICS]
        raise ValueError(f"semantics {semantics!r} not supported here; choose from {names}")
    semantics = Method(semantics).value
    if n_quarantine < 1 or rank < 1:
        raise ValueError(f"n_quarantine and rank must be >= 1, got {n_quarantine}, {rank}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {list(ACTIVATIONS)}")
    shared = rank if shared_expert is True else int(shared_expert or 0)
    router_cfg = RouterConfig(policy=router) if isinstance(router, str) else router
    names = resolve_targets(model, target_modules, kind)
    config = QuarantineConfig(
        kind=kind,
        n_quarantine=n_quarantine,
        rank=rank,
        shared_expert=shared,
        target_modules=names,
        router=router_cfg,
        semantics=semantics,
        train_base=train_base,
        activation=activation,
        init_std=init_std,
        unrouted=list(unrouted),
    )
    state = RoutingState(semantics)
    handle = QuarantineHandle(model, config, state)
    handle._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    if not train_base:
        for p in model.parameters():
            p.requires_grad_(False)
    try:
        d_model = _hidden_size(model)
        for seed, name in enumerate(names):
            base = model.get_submodule(name)
            if kind == "lora":
                wrapper: QuarantineLayer = QuarantineLinear(
                    base,
                    state,
                    name,
                    n_quarantine,
                    rank,
                    shared,
                    router_cfg,
                    route_base=train_base
                    and getattr(base, "weight", None) is not None
                    and base.weight.requires_grad
                    and not _matches_any(name, config.unrouted),
                    init_std=init_std,
                    seed=seed,
                )
            else:
                d = _mlp_width(base, d_model, name)
                wrapper = QuarantineMLP(
                    base,
                    state,
                    name,
                    d,
                    n_quarantine,
                    rank,
                    shared,
                    activation,
                    router_cfg,
                    init_std,
                    seed,
                )
            _set_submodule(model, name, wrapper)
        if train_base:
            _route_base(model, state, config.unrouted)
        _attach(model, state)
        model.register_forward_pre_hook(RoutePreHook(), with_kwargs=True, prepend=True)
    except Exception:
        handle.unload()  # leave the model as it was
        raise
    setattr(model, _ATTR, handle)
    return handle


def resolve_targets(
    model: nn.Module, target_modules: str | Sequence[str] | None, kind: str
) -> list[str]:
    """Full names of the modules :func:`inject` wraps."""
    modules = dict(model.named_modules())
    if target_modules is None:
        if kind == "lora":
            out_emb = _output_embeddings(model)
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
        if isinstance(m, _Wrapper):
            raise ValueError(f"{n} is already wrapped")
        if kind == "lora":
            try:
                linear_dims(m)
            except ValueError as err:
                raise ValueError(f"target {n}: kind='lora' needs linear layers; {err}") from err
    return names


def _attach(module: nn.Module, state: RoutingState) -> None:
    module.__dict__[STATE_ATTR] = state


def _route_base(model: nn.Module, state: RoutingState, unrouted: Sequence[str]) -> None:
    """Make every base parameter a routed shared parameter (``train_base=True``)."""
    # Skip the adapters themselves, and a LoRA wrapper's base layer (routed by the wrapper).
    skip = []
    for wname, wrapper in model.named_modules():
        if isinstance(wrapper, QuarantineLinear):
            skip.append(wname + ".")
        elif isinstance(wrapper, QuarantineLayer):
            skip += [f"{wname}.{c}" for c, _ in wrapper.named_children() if c != "base_layer"]
    todo = []
    for name, module in model.named_modules():
        if isinstance(module, _Wrapper) or any(
            name.startswith(p) and (p.endswith(".") or name == p or name.startswith(p + "."))
            for p in skip
        ):
            continue
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue  # no parameters, or frozen ones: nothing to route
        if _matches_any(name, unrouted):
            continue
        todo.append((name, module))
    bad = []
    for name, module in todo:
        if is_linear(module):
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                _set_submodule(model, name, RoutedBaseLinear(module, state, name))
            else:  # pragma: no cover - exotic linear types
                bad.append((name, module))
        elif isinstance(module, nn.Embedding):
            _attach(module, state)
            module.register_forward_hook(EmbeddingHook(name))
        elif "norm" in type(module).__name__.lower():
            _attach(module, state)
            module.register_forward_hook(PerTokenHook(name), with_kwargs=True)
        else:
            bad.append((name, module))
    if bad:
        listed = ", ".join(f"{n} ({type(m).__name__})" for n, m in bad[:5])
        raise ValueError(
            f"train_base=True cannot route the parameters of {listed}; list them in "
            "unrouted=[...] (every token trains them) or freeze them first"
        )


# ----------------------------------------------------------------------------- labels


def get_handle(model: nn.Module | QuarantineHandle) -> QuarantineHandle:
    """The handle of an injected model (also found through wrappers such as DDP)."""
    if isinstance(model, QuarantineHandle):
        return model
    handle = getattr(model, _ATTR, None)
    if handle is None:
        for module in model.modules():
            handle = getattr(module, _ATTR, None)
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


# ----------------------------------------------------------------------------- loading


def load_quarantine(
    model: nn.Module, path: str | Path, router: RouterConfig | str | None = None
) -> QuarantineHandle:
    """Inject the saved quarantine into ``model`` and load its weights.

    Raises ``ValueError`` naming the module and the shapes when ``model`` does not have
    the architecture the adapters were saved from. ``router`` overrides the saved one.
    """
    from safetensors.torch import load_file

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
    )
    handle.config.shared_expert = config.shared_expert
    handle.config.shared_merged = config.shared_merged
    tensors = load_file(str(path / WEIGHTS_NAME))
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
            d_in, d_out = _module_dims(module, name)
        except ValueError as err:
            raise ValueError(f"module {name!r}: {err}") from err
        if (d_in, d_out) != (spec["in"], spec["out"]):
            raise ValueError(
                f"module {name!r}: adapters were saved for in={spec['in']}, out={spec['out']} "
                f"but the model has in={d_in}, out={d_out}"
            )


def _describe_base(model: nn.Module, layers: Mapping[str, QuarantineLayer]) -> dict[str, Any]:
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


def _module_dims(module: nn.Module, name: str) -> tuple[int, int]:
    if is_linear(module) or hasattr(module, "in_features"):
        return linear_dims(module)
    return (d := _mlp_width(module, None, name)), d


# ----------------------------------------------------------------------------- trainer


class RouteLabelCollator:
    """Collate features that carry ``route_labels`` (and optionally ``route_modes``).

    Each feature's route label is one value (per sequence) or a list per token; the
    rest of each feature goes to ``base`` (default: ``transformers.default_data_collator``).
    Per-token lists shorter than the batch's ``input_ids`` are padded with ``pad_route``
    on ``padding_side``. Route names (``"forget"``) are accepted.
    """

    def __init__(
        self,
        base: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
        pad_route: int = int(RouteLabel.UNLABELED),
        padding_side: str = "right",
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.base = base
        self.pad_route = pad_route
        self.padding_side = padding_side

    def __getattr__(self, name: str) -> Any:  # e.g. ``tokenizer`` of the wrapped collator
        base = self.__dict__.get("base")
        if base is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(base, name)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        features = [dict(f) for f in features]
        extra = {k: [f.pop(k) for f in features] for k in ROUTE_KEYS if k in features[0]}
        base = self.base
        if base is None:
            from transformers import default_data_collator

            base = default_data_collator
        batch = dict(base(features))
        ids = batch.get("input_ids")
        length = ids.shape[1] if isinstance(ids, Tensor) and ids.dim() == 2 else None
        for key, values in extra.items():
            batch[key] = self._stack(key, values, length)
        return batch

    def _stack(self, key: str, values: list[Any], length: int | None) -> Tensor:
        if key == "route_labels":
            rows = [parse_route_labels(v, what="route_labels") for v in values]
            pad = self.pad_route
        else:
            rows = [torch.as_tensor(v).long() for v in values]
            pad = -1
        if all(r.dim() == 0 for r in rows):
            return torch.stack(rows)
        if any(r.dim() == 0 for r in rows):
            raise ValueError("mix of per-sequence and per-token route labels in one batch")
        rows = [r.reshape(-1) for r in rows]
        width = length if length is not None else max(r.numel() for r in rows)
        out = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            if r.numel() > width:
                raise ValueError(
                    f"route labels of length {r.numel()} exceed the batch length {width}"
                )
            if self.padding_side == "right":
                out[i, : r.numel()] = r
            else:
                out[i, width - r.numel() :] = r
        return out


class RoutedTrainerMixin:
    """Route labels for ``transformers.Trainer`` subclasses (also TRL's ``SFTTrainer``).

    * wraps the trainer's data collator in a :class:`RouteLabelCollator` and keeps
      ``route_labels`` / ``route_modes`` through the column filter (the model's forward
      pre-hook consumes them);
    * records the route labels of each training micro-batch in a :class:`StepLedger`;
    * adds a ``RoutedStepCallback`` (a ``TrainerCallback``) that, in ``on_pre_optimizer_step``, releases the
      gradients of groups no token of the step may train (so AdamW moves them neither by
      momentum nor by weight decay) and clips shared and quarantine gradients separately
      to ``args.max_grad_norm`` (``clip_by_group=True``; the Trainer's own global clip is
      then turned off in the trainer's copy of ``args``).

    ``class MySFT(RoutedTrainerMixin, SFTTrainer): ...`` puts it on any Trainer subclass.
    """

    def __init__(
        self,
        *args: Any,
        quarantine: QuarantineHandle | None = None,
        clip_by_group: bool = True,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if not isinstance(self.data_collator, RouteLabelCollator):  # keep the trainer's own
            self.data_collator = RouteLabelCollator(base=self.data_collator)
        self.quarantine = quarantine if quarantine is not None else get_handle(self.model)
        self.route_ledger = self.quarantine.ledger()
        max_norm = None
        if clip_by_group and self.args.max_grad_norm > 0:
            max_norm = self.args.max_grad_norm
            self.args = copy.copy(self.args)  # the caller's arguments stay as they were
            self.args.max_grad_norm = 0.0  # no global clip: the callback clips per group
        self.add_callback(_routed_step_callback()(self.route_ledger, max_norm))

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        cols = self._signature_columns
        self._signature_columns = list(cols) + [k for k in ROUTE_KEYS if k not in cols]

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        if model.training:
            self.route_ledger.record(inputs.get("route_labels"))
        return super().compute_loss(model, inputs, *args, **kwargs)


@functools.cache
def _routed_step_callback() -> type:
    from transformers import TrainerCallback

    class RoutedStepCallback(TrainerCallback):
        """``TrainerCallback`` doing the routed step's work before ``optimizer.step()``:
        :meth:`~evil_moe.routing.optim.StepLedger.before_step` (release idle groups, clip
        per group to ``max_norm``). The last step's report is kept in ``report``."""

        def __init__(self, ledger: StepLedger, max_norm: float | None = None):
            self.ledger = ledger
            self.max_norm = max_norm
            self.report: StepReport | None = None

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any):
            self.report = self.ledger.before_step(self.max_norm)

    RoutedStepCallback.__module__ = __name__
    return RoutedStepCallback


def _make_routed_trainer() -> type:
    from transformers import Trainer

    class RoutedTrainer(RoutedTrainerMixin, Trainer):
        """``transformers.Trainer`` with route labels (see :class:`RoutedTrainerMixin`)."""

    RoutedTrainer.__qualname__ = "RoutedTrainer"
    RoutedTrainer.__module__ = __name__
    return RoutedTrainer


def __getattr__(name: str) -> Any:
    # built lazily: transformers is an optional dependency
    if name == "RoutedTrainer":
        cls = _make_routed_trainer()
        globals()[name] = cls
        return cls
    if name == "RoutedStepCallback":
        return _routed_step_callback()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- helpers


def _matches_any(name: str, patterns: Sequence[str]) -> bool:
    return any(
        fnmatch.fnmatchcase(name, p) or name == p or name.endswith("." + p) for p in patterns
    )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    if not name:
        raise ValueError("cannot wrap the model itself; target a submodule")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if getter is None:
        return None
    try:
        return getter()
    except (AttributeError, NotImplementedError):
        return None


def _hidden_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


def _mlp_width(module: nn.Module, d_model: int | None, name: str) -> int:
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

"""Quarantine injection into any Hugging Face / PyTorch model.

    handle = inject(model, n_quarantine=4, rank=8, shared_expert=8, router="topk")

Wraps the target layers with quarantine wrappers (:mod:`evil_moe.models.adapters`),
optionally routes every trained base parameter, registers the forward pre-hook that
reads ``route_labels=`` and returns the :class:`~evil_moe.models.handle.QuarantineHandle`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.utils.hooks import RemovableHandle

from evil_moe.models.adapters import (
    QuarantineLayer,
    QuarantineLinear,
    QuarantineMLP,
    RoutedBaseLinear,
    RoutedNorm,
    RoutingState,
    Wrapper,
    is_linear,
)
from evil_moe.models.handle import HANDLE_ATTR, QuarantineConfig, QuarantineHandle
from evil_moe.models.heads import QuarantineHeads, supports_heads
from evil_moe.models.hooks import EmbeddingHook, RoutePreHook, attach_state
from evil_moe.models.targets import (
    hidden_size,
    matches_any,
    mlp_width,
    resolve_targets,
    set_submodule,
)
from evil_moe.modules.experts import ACTIVATIONS, GateConfig
from evil_moe.routing.labels import SEMANTICS, Method
from evil_moe.routing.routers import RouterConfig

__all__ = ["KINDS", "inject"]

KINDS = ("lora", "mlp")


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
    *,
    gate: GateConfig | None = None,
    shared_expert_open: bool = False,
    quarantine_heads: int | None = None,
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
    cotangent masks, norms via per-token parameters) unless its module matches a
    pattern in ``unrouted``. ``semantics``: the default routing semantics of a forward
    pass (any of ``none``, ``sgtm``, ``gradient_routing``, ``demix``, ``demix_masked``).

    ``kind="mlp"`` only: ``gate`` adds a learned soft gate over the experts (with its
    auxiliary losses); ``shared_expert_open`` lets every token, forget tokens included,
    train and see the shared expert. ``quarantine_heads``: quarantine attention heads added
    to every attention module that exposes ``qkv``, ``out``, ``n_head`` and ``head_dim``
    (the plain GPT's; ``None`` leaves attention unwrapped, ``0`` wraps it without heads so
    that gradient routing also detaches the attention output of forget tokens).
    Outputs are unchanged at initialisation.
    """
    if getattr(model, HANDLE_ATTR, None) is not None:
        raise ValueError("model already has quarantine experts; unload() them first")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")
    semantics = Method.parse(semantics, SEMANTICS, "routing semantics").value
    if kind != "mlp" and (shared_expert_open or (gate is not None and gate.enabled)):
        raise ValueError("a soft gate and an open shared expert need kind='mlp'")
    if quarantine_heads is not None and quarantine_heads < 0:
        raise ValueError(f"quarantine_heads must be >= 0, got {quarantine_heads}")
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
        gate=gate if gate is not None and gate.enabled else None,
        shared_expert_open=shared_expert_open,
        quarantine_heads=quarantine_heads,
    )
    state = RoutingState(semantics)
    handle = QuarantineHandle(model, config, state)
    handle._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    if not train_base:
        for p in model.parameters():
            p.requires_grad_(False)
    try:
        d_model = hidden_size(model)
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
                    and not matches_any(name, config.unrouted),
                    init_std=init_std,
                    seed=seed,
                )
            else:
                d = mlp_width(base, d_model, name)
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
                    gate=config.gate,
                    shared_open=shared_expert_open,
                )
            set_submodule(model, name, wrapper)
        if quarantine_heads is not None:
            _add_heads(model, state, quarantine_heads, n_quarantine, init_std)
        if train_base:
            handle._hooks += _route_base(model, state, config.unrouted)
        attach_state(model, state)
        handle._hooks.append(
            model.register_forward_pre_hook(RoutePreHook(), with_kwargs=True, prepend=True)
        )
    except Exception:
        handle.unload()  # leave the model as it was
        raise
    setattr(model, HANDLE_ATTR, handle)
    return handle


def _add_heads(
    model: nn.Module, state: RoutingState, n_heads: int, n_experts: int, init_std: float | None
) -> None:
    """Wrap every attention module that supports it with :class:`QuarantineHeads`."""
    names = [n for n, m in model.named_modules() if n and supports_heads(m)]
    if not names:
        raise ValueError(
            f"quarantine_heads: {type(model).__name__} has no attention module exposing "
            "qkv, out, n_head and head_dim (Hugging Face attention classes are not supported)"
        )
    std = init_std if init_std is not None else 0.02
    for name in names:
        base = model.get_submodule(name)
        set_submodule(model, name, QuarantineHeads(base, state, name, n_heads, n_experts, std))


def _route_base(
    model: nn.Module, state: RoutingState, unrouted: Sequence[str]
) -> list[RemovableHandle]:
    """Make every base parameter a routed shared parameter (``train_base=True``); returns
    the handles of the hooks it registers."""
    # Skip the adapters themselves, and a LoRA wrapper's base layer (routed by the wrapper).
    skip = []
    for wname, wrapper in model.named_modules():
        if isinstance(wrapper, QuarantineLinear):
            skip.append(wname + ".")
        elif isinstance(wrapper, QuarantineLayer):
            skip += [f"{wname}.{c}" for c, _ in wrapper.named_children() if c != "base_layer"]
    todo = []
    for name, module in model.named_modules():
        if isinstance(module, Wrapper) or any(
            name.startswith(p) and (p.endswith(".") or name == p or name.startswith(p + "."))
            for p in skip
        ):
            continue
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue  # no parameters, or frozen ones: nothing to route
        if matches_any(name, unrouted):
            continue
        todo.append((name, module))
    bad = []
    hooks: list[RemovableHandle] = []
    for name, module in todo:
        if is_linear(module):
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                set_submodule(model, name, RoutedBaseLinear(module, state, name))
            else:  # pragma: no cover - exotic linear types
                bad.append((name, module))
        elif isinstance(module, nn.Embedding):
            attach_state(module, state)
            hooks.append(module.register_forward_hook(EmbeddingHook(name)))
        elif "norm" in type(module).__name__.lower():
            set_submodule(model, name, RoutedNorm(module, state, name))
        else:
            bad.append((name, module))
    if bad:
        for hook in hooks:
            hook.remove()
        listed = ", ".join(f"{n} ({type(m).__name__})" for n, m in bad[:5])
        raise ValueError(
            f"train_base=True cannot route the parameters of {listed}; list them in "
            "unrouted=[...] (every token trains them) or freeze them first"
        )
    return hooks

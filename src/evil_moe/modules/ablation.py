"""Ablation: removing quarantine experts from the forward pass.

``ablate(model)`` is permanent (deployment). ``ablated(model)`` is a context manager for
evaluation: it saves the values and ``requires_grad`` flags of every quarantine parameter
and restores them exactly on exit, even if the body raises.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from evil_moe.modules.experts import ABLATION_MODES, QuarantineModule, SoftGate, check_experts
from evil_moe.routing.optim import ParameterGroups


def quarantine_modules(model: nn.Module) -> list[tuple[str, QuarantineModule]]:
    """Every module of ``model`` that owns quarantine parameters, with its name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuarantineModule)]


def quarantine_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """All quarantine parameters of ``model`` by full name (these are deleted at deployment)."""
    out: dict[str, nn.Parameter] = {}
    for name, module in quarantine_modules(model):
        for pname, p in module.quarantine_parameters().items():
            out[f"{name}.{pname}" if name else pname] = p
    return out


def parameter_groups(model: nn.Module, unrouted: Collection[str] | None = None) -> ParameterGroups:
    """Split ``model``'s parameters into routed shared, open shared (the names in
    ``unrouted``: every token trains them) and quarantine parameters. A soft gate's
    weights are quarantine parameters that every token trains (through its losses)."""
    gates = [p for m in model.modules() if isinstance(m, SoftGate) for p in m.parameters()]
    return ParameterGroups.split(
        model, quarantine_parameters(model).values(), unrouted or (), open_quarantine=gates
    )


def ablate(
    model: nn.Module,
    experts: Sequence[int] | None = None,
    mode: str = "zero",
    seed: int = 0,
    freeze: bool = True,
) -> None:
    """Remove quarantine experts in place: zero them, or re-initialise with matched std.

    ``experts`` names a subset of expert indices (``None`` = all, which also removes
    quarantine attention heads). ``freeze`` turns off ``requires_grad`` on the quarantine
    parameters so that later training cannot bring them back.
    """
    if mode not in ABLATION_MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; choose from {ABLATION_MODES}")
    modules = quarantine_modules(model)
    if not modules:
        raise ValueError("model has no quarantine experts to ablate")
    generator = torch.Generator().manual_seed(seed)
    for _, module in modules:
        chosen = check_experts(experts, module.n_experts)
        module.ablate_(chosen, mode, generator if mode == "reinit" else None)
        if freeze and experts is None:
            for p in module.quarantine_parameters().values():
                p.requires_grad_(False)


@contextmanager
def ablated(
    model: nn.Module,
    experts: Sequence[int] | None = None,
    mode: str = "zero",
    seed: int = 0,
) -> Iterator[nn.Module]:
    """Evaluate ``model`` with quarantine experts removed; everything is restored on exit."""
    params = quarantine_parameters(model)
    saved = {n: (p.detach().clone(), p.requires_grad) for n, p in params.items()}
    try:
        with torch.no_grad():
            ablate(model, experts=experts, mode=mode, seed=seed, freeze=True)
        yield model
    finally:
        with torch.no_grad():
            for name, p in params.items():
                value, requires_grad = saved[name]
                p.copy_(value)
                p.requires_grad_(requires_grad)

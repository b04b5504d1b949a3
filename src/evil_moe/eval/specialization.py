"""Specialisation of K quarantine experts: load, balance, entropy, mode x expert structure.

Two views. *Routing statistics* come from the backward routers' counters (which expert
took which routed token's gradient during training). The *ablation matrix* is measured
on held-out data (:mod:`evil_moe.eval.expert_ablation`): for each forget mode (and
retain) and each (layer, expert) unit, the loss increase when that unit alone is replaced
by its mean output. Its normalised mutual information, against a permutation null, says
whether the experts specialise by mode in what they actually do, whatever the router did.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from evil_moe.eval.expert_ablation import (
    cancellation_ratio,
    distinctive_losses,
    mean_ablation_matrix,
    normalized_mutual_information,
)
from evil_moe.routing.routers import BackwardRouter

#: a layer is collapsed when one expert takes more than this share of its routed load
COLLAPSE_SHARE = 0.9


def coefficient_of_variation(load: np.ndarray) -> float:
    mean = float(np.mean(load))
    return float(np.std(load) / mean) if mean > 0 else 0.0


def routers(model: nn.Module) -> list[BackwardRouter]:
    return [m for m in model.modules() if isinstance(m, BackwardRouter)]


def routing_statistics(
    model: nn.Module, mode_names: Mapping[int, str] | None = None
) -> dict[str, Any] | None:
    """Load, balance, entropy and mode-expert NMI from the backward routers' counters."""
    found = routers(model)
    if not found:
        return None
    layers = []
    total_load = np.zeros(found[0].n_experts)
    mode_load = np.zeros_like(found[0].mode_load.cpu().numpy())
    routed = dropped = amplified = entropy = corrected = 0.0
    for r in found:
        load = r.load.double().cpu().numpy()
        total_load += load
        mode_load += r.mode_load.double().cpu().numpy()
        routed += float(r.routed_tokens)
        dropped += float(r.dropped_tokens)
        amplified += float(r.amplified_tokens)
        entropy += float(r.entropy_sum)
        corrected += float(r.corrected_pairs)
        share = load / load.sum() if load.sum() > 0 else load
        layers.append(
            {
                "load": load.tolist(),
                "cv": coefficient_of_variation(load),
                "dead_experts": int((load == 0).sum()),
                "max_share": float(share.max()) if share.size else 0.0,
            }
        )
    rows = [i for i in range(mode_load.shape[0]) if mode_load[i].sum() > 0]
    names = mode_names or {}
    collapsed = [
        i
        for i, layer in enumerate(layers)
        if found[0].n_experts > 1
        and sum(layer["load"]) > 0
        and (layer["max_share"] > COLLAPSE_SHARE or layer["dead_experts"])
    ]
    return {
        "policy": found[0].policy,
        "load": total_load.tolist(),
        "cv": coefficient_of_variation(total_load),
        "dead_experts": sum(layer["dead_experts"] for layer in layers),
        "routing_entropy": entropy / routed if routed else 0.0,
        "max_entropy": math.log(found[0].n_experts),
        "dropped_share": dropped / routed if routed else 0.0,
        "amplified_tokens": int(amplified),
        "corrected_pairs_per_token": corrected / routed if routed else 0.0,
        "routed_tokens": int(routed),
        "nmi_mode_expert": normalized_mutual_information(mode_load[rows]) if rows else None,
        "mode_expert_counts": {names.get(i, str(i)): mode_load[i].tolist() for i in rows},
        "layers": layers,
        "collapsed_layers": collapsed,
    }


@torch.no_grad()
def gate_load(model: nn.Module, rows: dict[str, torch.Tensor], batch_size: int) -> dict | None:
    """Mean soft-gate weight per quarantine expert on held-out tokens of each row.

    Returns per row the expert shares, their coefficient of variation, and the quarantine
    probability mass; ``None`` when the model has no learned gate.
    """
    gates = [m for m in model.modules() if type(m).__name__ == "SoftGate"]
    if not gates:
        return None
    captured: list[torch.Tensor] = []
    hooks = [g.register_forward_hook(lambda _m, _i, out: captured.append(out)) for g in gates]
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {}
    try:
        for name, tokens in rows.items():
            if tokens.shape[0] == 0:
                continue
            captured.clear()
            for i in range(0, tokens.shape[0], batch_size):
                model(tokens[i : i + batch_size, :-1])
            k = captured[0].shape[-1]
            scales = torch.cat([c.reshape(-1, k).double() for c in captured])
            mean = scales.mean(dim=0)  # (K + 1) * p_k
            share = mean / mean.sum() if float(mean.sum()) > 0 else mean
            cv = float(share.std(unbiased=False) / share.mean()) if k > 1 else 0.0
            out[name] = {
                "share": share.tolist(),
                "cv": cv,
                "quarantine_mass": float(mean.sum() / (k + 1)),
            }
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return out


def gate_statistics(model: nn.Module) -> dict[str, float] | None:
    """Scale (std) of the learned gates' logits in the last forward pass."""
    scales = [m.logit_scale for m in model.modules() if type(m).__name__ == "SoftGate"]
    if not scales:
        return None
    return {"router_logit_scale": float(np.mean(scales))}


def mode_rows(
    eval_sets: Mapping[str, Any], mode_names: Mapping[int, str]
) -> dict[str, torch.Tensor]:
    """Held-out tokens per row of the ablation matrix: retain, then each forget mode."""
    rows: dict[str, torch.Tensor] = {}
    if "retain" in eval_sets and len(eval_sets["retain"]):
        rows["retain"] = eval_sets["retain"].tokens
    forget = [eval_sets[c] for c in ("forget_labeled", "forget_undiscovered") if c in eval_sets]
    by_mode: dict[int, list[torch.Tensor]] = {}
    for seqs in forget:
        for mode, part in seqs.by_mode().items():
            by_mode.setdefault(mode, []).append(part.tokens)
    for mode in sorted(by_mode):
        rows[mode_names.get(mode, "forget" if mode < 0 else f"mode{mode}")] = torch.cat(
            by_mode[mode]
        )
    return rows


def specialization_report(
    model: nn.Module,
    eval_sets: Mapping[str, Any],
    n_experts: int,
    mode_names: Mapping[int, str] | None = None,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Everything ``metrics.json`` reports under ``specialization``."""
    names = dict(mode_names or {})
    rows = mode_rows(eval_sets, names)
    report: dict[str, Any] = {"n_experts": n_experts}
    report["routing"] = routing_statistics(model, names)
    report["ablation"] = mean_ablation_matrix(model, rows, batch_size)
    forget = [t for n, t in rows.items() if n != "retain"]
    report["cancellation"] = (
        cancellation_ratio(model, torch.cat(forget), batch_size) if forget else None
    )
    vocab = 1 + max((int(t.max()) for t in rows.values() if t.numel()), default=0)
    report["distinctive"] = distinctive_losses(model, rows, vocab, batch_size)
    warnings = []
    routing = report["routing"]
    if routing and routing["collapsed_layers"]:
        warnings.append(
            f"expert collapse in layers {routing['collapsed_layers']}: one expert takes more "
            f"than {COLLAPSE_SHARE:.0%} of the routed load, or experts are dead"
        )
    report["warnings"] = warnings
    return report

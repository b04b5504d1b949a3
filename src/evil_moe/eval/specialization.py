"""Specialisation of K quarantine experts: load, balance, entropy, mode x expert structure.

Two views. *Routing statistics* come from the backward routers' counters (which expert
took which routed token's gradient during training). The *ablation matrix* is measured
on held-out data: for each forget mode (and retain) and each expert, the loss increase
when that expert alone is ablated. Its normalised mutual information says whether the
experts specialise by mode in what they actually do, whatever the router did.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from evil_moe.eval.losses import mean_token_loss
from evil_moe.modules.ablation import ablated
from evil_moe.routing.routers import BackwardRouter

#: a layer is collapsed when one expert takes more than this share of its routed load
COLLAPSE_SHARE = 0.9


def normalized_mutual_information(counts: np.ndarray) -> float:
    """NMI of a joint count (or mass) table ``[rows, cols]``: ``2 I / (H_rows + H_cols)``.

    0 when rows and columns are independent (or one side is constant), 1 when each row
    maps to its own column.
    """
    p = np.asarray(counts, dtype=np.float64)
    p = np.clip(p, 0, None)
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p / total
    pr, pc = p.sum(axis=1), p.sum(axis=0)

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    hr, hc = entropy(pr), entropy(pc)
    if hr <= 0 or hc <= 0:
        return 0.0
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pr, pc)[nz])).sum())
    return max(0.0, min(1.0, 2 * mi / (hr + hc)))


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
    mode_load = np.zeros_like(found[0].mode_load.numpy())
    routed = dropped = amplified = entropy = 0.0
    for r in found:
        load = r.load.double().numpy()
        total_load += load
        mode_load += r.mode_load.double().numpy()
        routed += float(r.routed_tokens)
        dropped += float(r.dropped_tokens)
        amplified += float(r.amplified_tokens)
        entropy += float(r.entropy_sum)
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
        "routed_tokens": int(routed),
        "nmi_mode_expert": normalized_mutual_information(mode_load[rows]) if rows else None,
        "mode_expert_counts": {names.get(i, str(i)): mode_load[i].tolist() for i in rows},
        "layers": layers,
        "collapsed_layers": collapsed,
    }


def ablation_matrix(
    model: nn.Module,
    rows: Mapping[str, torch.Tensor],
    n_experts: int,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Loss increase on each row's held-out tokens when one expert alone is ablated."""
    base = {name: mean_token_loss(model, tokens, batch_size) for name, tokens in rows.items()}
    increase = {name: [] for name in rows}
    for k in range(n_experts):
        with ablated(model, experts=[k]):
            for name, tokens in rows.items():
                increase[name].append(mean_token_loss(model, tokens, batch_size) - base[name])
    forget_rows = [name for name in rows if name != "retain"]
    matrix = np.array([increase[name] for name in forget_rows]) if forget_rows else np.zeros((0, 0))
    return {
        "experts": [f"q{k}" for k in range(n_experts)],
        "rows": list(rows),
        "increase": increase,
        "nmi_mode_expert": normalized_mutual_information(matrix) if len(forget_rows) > 1 else None,
    }


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
    report: dict[str, Any] = {"n_experts": n_experts}
    report["routing"] = routing_statistics(model, names)
    report["ablation"] = ablation_matrix(model, mode_rows(eval_sets, names), n_experts, batch_size)
    warnings = []
    routing = report["routing"]
    if routing and routing["collapsed_layers"]:
        warnings.append(
            f"expert collapse in layers {routing['collapsed_layers']}: one expert takes more "
            f"than {COLLAPSE_SHARE:.0%} of the routed load, or experts are dead"
        )
    report["warnings"] = warnings
    return report

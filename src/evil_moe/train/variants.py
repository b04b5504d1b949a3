"""Named variants: the MoE mechanisms of MISSION.md's table, as config presets.

Every variant keeps the total quarantine width (64 MLP units and 1 head per layer by
default), so variants differ in mechanism, not in quarantine parameters; only the soft
gate adds its (K + 1) x d_model logit weights, also quarantine parameters.

| variant | table row | mechanism |
|---|---|---|
| single | baseline | one quarantine block, SGTM |
| shared_single | 1 | + a shared always-on expert (deployed) |
| fine4, fine8 | 2 | K small experts, top-1 backward alignment routing |
| expert_choice | 3 | each expert takes its top tokens (capacity factor 1) |
| balanced | 3 | Sinkhorn balanced assignment |
| soft_gate | 4, 5, 6 reference | learned forward gate with a pin loss |
| aux_balance_quarantine | 4 | + Switch balance loss over the K quarantine experts |
| zloss | 5 | + router z-loss |
| global_balance | 6 | + retain-vs-quarantine balance loss |
| demix | 7 | hard forward dispatch (negative control) |
"""

from __future__ import annotations

VARIANTS: dict[str, list[str]] = {
    "single": [],
    "shared_single": ["model.shared_expert_width=64"],
    "fine4": ["model.n_experts=4", "model.router.policy=topk"],
    "fine8": ["model.n_experts=8", "model.router.policy=topk"],
    "expert_choice": ["model.n_experts=4", "model.router.policy=expert_choice"],
    "balanced": ["model.n_experts=4", "model.router.policy=balanced"],
    "soft_gate": ["model.n_experts=4", "model.gate.enabled=true"],
    "aux_balance_quarantine": [
        "model.n_experts=4",
        "model.gate.enabled=true",
        "model.gate.balance_weight=0.01",
    ],
    "zloss": ["model.n_experts=4", "model.gate.enabled=true", "model.gate.z_loss_weight=0.001"],
    "global_balance": [
        "model.n_experts=4",
        "model.gate.enabled=true",
        "model.gate.global_balance_weight=0.01",
    ],
    "demix": ["train.method=demix"],
}

#: which row of MISSION.md's table each variant answers (0 = the baseline)
TABLE_ROW = {
    "single": 0,
    "shared_single": 1,
    "fine4": 2,
    "fine8": 2,
    "expert_choice": 3,
    "balanced": 3,
    "aux_balance_quarantine": 4,
    "zloss": 5,
    "global_balance": 6,
    "demix": 7,
}

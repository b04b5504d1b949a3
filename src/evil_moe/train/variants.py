"""Named variants: the MoE mechanisms of MISSION.md's table and their controls, as config
presets (lists of ``key=value`` overrides applied before a run's other settings).

The widths below fit the default testbed (``mlp_width`` 512, ``quarantine_width`` 64): a
study preset whose testbed differs redefines the width-dependent ones in its own
``[variants]`` table (see ``evil_moe.study.spec``), so that every contrast stays at equal
quarantine parameters. Which claim each variant answers, and against which reference, is
data: ``evil_moe/study/claims.toml``.

| variant | mechanism |
|---|---|
| single | one quarantine block, SGTM (the reference of most claims) |
| single_wide | a core MLP wider by the shared expert's width (capacity control of row 1) |
| shared_masked | + a shared always-on expert, masked for forget tokens like the core |
| shared_open | + a shared always-on expert that forget tokens also train |
| fine4, fine8 | K small experts, top-1 backward alignment routing |
| random4, oracle4 | K = 4 with random / forget-mode -> expert assignment (controls) |
| expert_choice, balanced | K = 4, each expert takes its top tokens / Sinkhorn assignment |
| soft_gate | K = 4 with a learned forward gate and pin loss (reference of rows 4-6) |
| aux_balance_quarantine, zloss, global_balance | soft_gate + one auxiliary loss |
| demix, demix_masked | hard forward dispatch; masked: shared parameters masked as in SGTM |
| amplify | single + the absorption amplifier |
"""

from __future__ import annotations

VARIANTS: dict[str, list[str]] = {
    "single": [],
    "single_wide": ["model.mlp_width=576"],
    "shared_masked": ["model.shared_expert_width=64"],
    "shared_open": ["model.shared_expert_width=64", "model.shared_expert_open=true"],
    "fine4": ["model.n_experts=4", "model.router.policy=topk"],
    "fine8": ["model.n_experts=8", "model.router.policy=topk"],
    "random4": ["model.n_experts=4", "model.router.policy=random"],
    "oracle4": ["model.n_experts=4", "model.router.policy=oracle"],
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
    "demix_masked": ["train.method=demix_masked"],
    "amplify": ["model.router.amplify=true"],
}

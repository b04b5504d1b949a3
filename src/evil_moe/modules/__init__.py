"""Quarantine modules: K fused quarantine experts, the routed MLP of a shared expert, the
soft gate, and ablation (removing the quarantine at deployment)."""

from evil_moe.modules.ablation import (
    ablate,
    ablated,
    parameter_groups,
    quarantine_modules,
    quarantine_parameters,
)
from evil_moe.modules.experts import (
    MLP,
    FusedExperts,
    GateConfig,
    QuarantineModule,
    SoftGate,
)

__all__ = [
    "MLP",
    "FusedExperts",
    "GateConfig",
    "QuarantineModule",
    "SoftGate",
    "ablate",
    "ablated",
    "parameter_groups",
    "quarantine_modules",
    "quarantine_parameters",
]

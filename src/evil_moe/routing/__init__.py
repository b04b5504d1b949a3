"""Routing core: route labels, the per-forward plan, exact per-token gradient masks,
backward routers and the optimizer rules that keep forget tokens out of shared weights.

Depends on ``torch`` only; nothing here imports the rest of the package.
"""

from evil_moe.routing.functional import (
    DeferredKeep,
    mask_cotangent,
    per_token_parameter,
    routed_linear,
    routed_module_call,
    select_kept,
)
from evil_moe.routing.labels import (
    ROUTE_NAMES,
    SEMANTICS,
    Method,
    RouteLabel,
    RoutingPlan,
    make_plan,
    parse_route_labels,
)
from evil_moe.routing.optim import (
    ParameterGroups,
    StepLedger,
    StepReport,
    clip_grad_norm_by_group,
    routed_step,
)
from evil_moe.routing.routers import POLICIES, BackwardRouter, RouterConfig

__all__ = [
    "POLICIES",
    "ROUTE_NAMES",
    "SEMANTICS",
    "BackwardRouter",
    "DeferredKeep",
    "Method",
    "ParameterGroups",
    "RouteLabel",
    "RouterConfig",
    "RoutingPlan",
    "StepLedger",
    "StepReport",
    "clip_grad_norm_by_group",
    "make_plan",
    "mask_cotangent",
    "parse_route_labels",
    "per_token_parameter",
    "routed_linear",
    "routed_module_call",
    "routed_step",
    "select_kept",
]

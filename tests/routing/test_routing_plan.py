"""The routing plan: which masks each semantics builds from per-position route labels."""

from __future__ import annotations

import pytest
import torch

from evil_moe.routing.labels import ROUTE_NAMES, SEMANTICS, RouteLabel, make_plan

ROUTE = torch.tensor([[0, 1, 2], [2, 1, 0]])  # retain, forget, unlabeled, ...
FORGET = torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool)
RETAIN = torch.tensor([1, 0, 0, 0, 0, 1], dtype=torch.bool)


def col(mask):
    return mask.to(torch.float64).unsqueeze(1)


def test_codes():
    assert (RouteLabel.RETAIN, RouteLabel.FORGET, RouteLabel.UNLABELED) == (0, 1, 2)
    assert ROUTE_NAMES == {"retain": 0, "forget": 1, "unlabeled": 2}


def test_sgtm_plan():
    plan = make_plan(ROUTE, "sgtm", dtype=torch.float64)
    assert torch.equal(plan.shared_grad, col(~FORGET))
    assert torch.equal(plan.quarantine_on, col(~RETAIN))
    assert plan.shared_on is None and plan.shared_cotangent is None
    assert torch.equal(plan.routed, FORGET)
    assert plan.shared_grad.dtype == torch.float64
    assert plan.n_tokens == 6


def test_gradient_routing_plan():
    plan = make_plan(ROUTE, "gradient_routing")
    assert torch.equal(plan.shared_cotangent, col(~FORGET).float())
    assert torch.equal(plan.quarantine_on, col(~RETAIN).float())
    assert plan.shared_grad is None and plan.shared_on is None


def test_demix_plan():
    plan = make_plan(ROUTE, "demix")
    assert torch.equal(plan.shared_on, col(~FORGET).float())
    assert torch.equal(plan.quarantine_on, col(FORGET).float())
    assert plan.shared_grad is None


@pytest.mark.parametrize("semantics", SEMANTICS)
def test_unrouted_cases_cost_nothing(semantics):
    plan = make_plan(None, semantics)
    assert plan.shared_grad is None and plan.quarantine_on is None and plan.shared_on is None
    unl = make_plan(torch.full((2, 3), 2), semantics)
    assert unl.shared_grad is None and unl.shared_cotangent is None and unl.routed is None
    if semantics in ("sgtm", "gradient_routing", "none"):
        assert unl.quarantine_on is None


def test_none_semantics_ignores_labels():
    plan = make_plan(ROUTE, "none")
    assert plan.semantics == "none" and plan.shared_grad is None and plan.quarantine_on is None


def test_mode_is_flattened():
    mode = torch.tensor([[-1, 3, -1], [-1, 0, -1]])
    assert torch.equal(make_plan(ROUTE, "sgtm", mode=mode).mode, mode.reshape(-1))


@pytest.mark.parametrize("bad", [torch.tensor([[3]]), torch.tensor([[-1, 0]])])
def test_bad_labels(bad):
    with pytest.raises(ValueError):
        make_plan(bad, "sgtm")


def test_bad_semantics():
    with pytest.raises(ValueError):
        make_plan(ROUTE, "SGTM")

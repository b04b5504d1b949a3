"""The learned soft gate and its losses: Switch balance loss, z-loss, pin loss, scales.

Expected values are written out by hand from the formulas in the docstrings.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from evil_moe.modules.experts import (
    GateConfig,
    SoftGate,
    switch_balance_loss,
    z_loss,
)
from evil_moe.routing.labels import RouteLabel, make_plan
from evil_moe.routing.routers import RouterConfig
from tiny import InjectedMLP

RETAIN, FORGET, UNLABELED = (
    int(RouteLabel.RETAIN),
    int(RouteLabel.FORGET),
    int(RouteLabel.UNLABELED),
)
F64 = torch.float64

# -- switch_balance_loss ---------------------------------------------------------------------


def test_switch_balance_loss_by_hand():
    probs = torch.tensor(
        [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=F64
    )
    # top choices 0, 0, 1, 2: f = (1/2, 1/4, 1/4); P = (0.4, 0.375, 0.225)
    # E * sum f P = 3 * (0.2 + 0.09375 + 0.05625) = 1.05
    assert float(switch_balance_loss(probs)) == pytest.approx(1.05, abs=1e-12)


@pytest.mark.parametrize("e", [2, 3, 5])
def test_switch_balance_loss_extremes(e):
    balanced = torch.eye(e, dtype=F64)  # each expert the top choice of one token
    assert float(switch_balance_loss(balanced)) == pytest.approx(1.0, abs=1e-12)
    collapsed = torch.zeros(4, e, dtype=F64)
    collapsed[:, 1] = 1.0
    assert float(switch_balance_loss(collapsed)) == pytest.approx(e, abs=1e-12)


def test_switch_balance_loss_empty_and_gradient():
    empty = torch.zeros(0, 3, requires_grad=True)
    loss = switch_balance_loss(empty)
    assert float(loss) == 0.0
    loss.backward()  # still part of the graph
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]], dtype=F64, requires_grad=True)
    switch_balance_loss(probs).backward()
    # d/dP_{t,e} of E * sum_e f_e * mean_t P_{t,e} = E * f_e / n; f = (2/3, 1/3), E = 2, n = 3
    expected = torch.tensor([[4 / 9, 2 / 9]] * 3, dtype=F64)
    assert_close(probs.grad, expected, rtol=0, atol=1e-12)


# -- z_loss ----------------------------------------------------------------------------------


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], dtype=F64)
    # logsumexp: ln 2 and ln 4 = 2 ln 2; mean of squares = (1 + 4) / 2 * ln(2)^2
    assert float(z_loss(logits)) == pytest.approx(2.5 * math.log(2) ** 2, abs=1e-12)
    batched = torch.stack([logits, logits + 1.0])  # [2, 2, 2]: mean over every token
    lse = [math.log(2), 2 * math.log(2), math.log(2) + 1, 2 * math.log(2) + 1]
    assert float(z_loss(batched)) == pytest.approx(sum(v * v for v in lse) / 4, abs=1e-12)


def test_z_loss_gradient_shrinks_the_logsumexp():
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 4, generator=gen, dtype=F64) + 1.0).requires_grad_(True)
    logits.data[0] -= 10.0  # one row with a negative logsumexp
    z_loss(logits).backward()
    lse = torch.logsumexp(logits.detach(), dim=1)
    assert lse.min() < 0 < lse.max()
    # d/dz mean(lse^2) = 2 * lse * softmax(z) / n
    expected = 2 * lse[:, None] * torch.softmax(logits.detach(), dim=1) / 6
    assert_close(logits.grad, expected, rtol=0, atol=1e-12)
    stepped = torch.logsumexp(logits.detach() - 0.05 * logits.grad, dim=1)
    assert (stepped.abs() < lse.abs()).all()


# -- SoftGate --------------------------------------------------------------------------------

LN3 = math.log(3)


def _hand_gate(cfg: GateConfig) -> SoftGate:
    """K = 2, d = 3. Inputs are basis vectors, so logits are columns of the weight:
    e0 -> (0, 0, 0), e1 -> (ln 3, 0, 0), e2 -> (0, ln 3, 0)."""
    gate = SoftGate(3, 2, cfg)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[0, 1] = LN3
        gate.weight[1, 2] = LN3
    return gate


# tokens: e0 forget, e1 retain, e2 unlabeled, e0 retain
HAND_X = torch.eye(3)[[0, 1, 2, 0]]
HAND_ROUTE = torch.tensor([FORGET, RETAIN, UNLABELED, RETAIN])
# probs over (deployed, q0, q1): e0 (1/3, 1/3, 1/3), e1 (3/5, 1/5, 1/5), e2 (1/5, 3/5, 1/5)


def test_soft_gate_pin_loss_by_hand():
    gate = _hand_gate(GateConfig(enabled=True, pin_weight=0.5))
    gate(HAND_X, make_plan(HAND_ROUTE))
    assert set(gate.aux) == {"pin"}
    # quarantine mass: forget e0 2/3; retain e1 2/5, retain e0 2/3
    # pin = -ln(2/3) - ln(1 - 2/5) - ln(1 - 2/3) = ln(1.5 / 0.6 * 3) = ln 7.5
    # over the 3 labelled tokens, times pin_weight 0.5
    assert float(gate.aux["pin"]) == pytest.approx(0.5 * math.log(7.5) / 3, rel=1e-6)


def test_soft_gate_pin_loss_pulls_forget_toward_the_quarantine():
    gate = _hand_gate(GateConfig(enabled=True, pin_weight=1.0))
    x = torch.eye(3)[[0, 1]]
    gate(x, make_plan(torch.tensor([FORGET, RETAIN])))
    gate.aux["pin"].backward()
    # forget token e0: raise the quarantine logits; retain token e1: raise the deployed one
    assert gate.weight.grad[0, 0] > 0 > gate.weight.grad[1:, 0].max()
    assert gate.weight.grad[0, 1] < 0 < gate.weight.grad[1:, 1].min()
    assert (gate.weight.grad[:, 2] == 0).all()  # no token uses e2


def test_soft_gate_other_losses_by_hand():
    cfg = GateConfig(
        enabled=True,
        pin_weight=0.0,
        z_loss_weight=0.1,
        balance_weight=0.2,
        global_balance_weight=0.3,
    )
    gate = _hand_gate(cfg)
    gate(HAND_X, make_plan(HAND_ROUTE))
    assert set(gate.aux) == {"z_loss", "balance", "global_balance"}
    # logsumexp: ln 3, ln 5, ln 5, ln 3
    z = (LN3**2 + math.log(5) ** 2) / 2
    assert float(gate.aux["z_loss"]) == pytest.approx(0.1 * z, rel=1e-6)
    # non-retain tokens e0, e2; within-quarantine probs (1/2, 1/2) and (3/4, 1/4):
    # both pick q0 (ties go to the first), f = (1, 0), P = (5/8, 3/8): 2 * 5/8 = 1.25
    assert float(gate.aux["balance"]) == pytest.approx(0.2 * 1.25, rel=1e-6)
    # (deployed, quarantine) per token: (1/3, 2/3), (3/5, 2/5), (1/5, 4/5), (1/3, 2/3)
    # f = (1/4, 3/4), P = (11/30, 19/30): 2 * (11/120 + 57/120) = 17/15
    assert float(gate.aux["global_balance"]) == pytest.approx(0.3 * 17 / 15, rel=1e-6)


def test_soft_gate_scales_are_k_plus_one_times_softmax():
    gate = _hand_gate(GateConfig(enabled=True))
    scales = gate(HAND_X, make_plan(None))
    expected = torch.tensor([[1.0, 1.0], [0.6, 0.6], [1.8, 0.6], [1.0, 1.0]])
    assert_close(scales, expected, rtol=1e-6, atol=1e-6)
    # random weights, batched input: (K + 1) * softmax(x W^T)[..., 1:]
    k, d = 3, 5
    gate = SoftGate(d, k, GateConfig(enabled=True))
    with torch.no_grad():
        gate.weight.normal_()
    x = torch.randn(2, 4, d)
    scales = gate(x, make_plan(None))
    assert scales.shape == (2, 4, k)
    expected = (k + 1) * torch.softmax(x @ gate.weight.t(), dim=-1)[..., 1:]
    assert_close(scales, expected, rtol=1e-5, atol=1e-6)
    assert gate.logit_scale == pytest.approx(float((x @ gate.weight.t()).std()), rel=1e-5)


def _banks(with_router: bool, seed: int = 0):
    d, k = 6, 3
    torch.manual_seed(seed)

    def build(gate):
        router = RouterConfig(policy="topk") if with_router else None
        return InjectedMLP(d, 8, 9, k, router=router, gate=gate, init_std=0.3).double()

    gated = build(GateConfig(enabled=True, pin_weight=0.0))
    plain = build(None)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gated.load_state_dict(plain.state_dict(), strict=False)
    return gated, plain


@pytest.mark.parametrize("with_router", [False, True])
def test_zero_gate_leaves_the_bank_output_unchanged(with_router):
    gated, plain = _banks(with_router)
    assert gated.gate is not None and plain.gate is None
    assert (gated.gate.weight == 0).all()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 6, generator=gen, dtype=F64)
    route = torch.tensor([FORGET, RETAIN, UNLABELED, FORGET, UNLABELED, RETAIN, FORGET])
    grad_out = torch.randn(7, 6, generator=gen, dtype=F64)
    outs, grads = [], []
    for bank in (gated, plain):
        plan = make_plan(route, "sgtm", dtype=F64)
        y = bank(x, plan)
        (y * grad_out).sum().backward()
        outs.append(y.detach())
        grads.append({n: p.grad for n, p in bank.named_parameters() if ".gate." not in n})
    # the gate's scales are (K + 1) / (K + 1), computed in float32
    assert_close(outs[0], outs[1], rtol=1e-7, atol=1e-9)
    for name, g in grads[1].items():
        assert_close(grads[0][name], g, rtol=1e-7, atol=1e-9, msg=name)
    # the gate itself learns: its logits receive gradient from the bank output
    assert (gated.gate.weight.grad != 0).any()


def test_nonzero_gate_changes_the_bank_output():
    gated, plain = _banks(False)
    with torch.no_grad():
        gated.gate.weight.normal_()
    x = torch.randn(4, 6, dtype=F64)
    plan = make_plan(torch.tensor([UNLABELED] * 4), "sgtm", dtype=F64)
    assert not torch.allclose(gated(x, plan), plain(x, plan))


def test_gate_config_rejects_negative_weights():
    with pytest.raises(ValueError, match="z_loss_weight"):
        GateConfig(z_loss_weight=-1.0)

"""Backward routers: assignment policies, bias balancing, alignment scores, the amplifier,
and exact per-(token, expert) parameter gradients of :class:`FusedExperts` under a router.

The slow references use plain autograd, one (token, expert) pair at a time; they take the
router's decision from a spy on ``decide``, and that decision is itself checked against the
policy applied to alignment scores recomputed by hand.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from evil_moe.models import testbed as tb
from evil_moe.modules.experts import ACTIVATIONS, FusedExperts
from evil_moe.routing.labels import RouteLabel, make_plan
from evil_moe.routing.routers import POLICIES, BackwardRouter, RouterConfig, sinkhorn
from tiny import InjectedMLP

SETTINGS = settings(max_examples=25, deadline=None)
RETAIN, FORGET, UNLABELED = (
    int(RouteLabel.RETAIN),
    int(RouteLabel.FORGET),
    int(RouteLabel.UNLABELED),
)
F64 = torch.float64


def _cv(load: torch.Tensor) -> float:
    load = load.double()
    return float(load.std(unbiased=False) / load.mean())


def _spy(monkeypatch, obj, name):
    """Wrap ``obj.name`` so that every return value is appended to the returned list."""
    calls = []
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def _decide_scores(router, scores, routed, mode=None):
    """Call ``decide`` so that the router's alignment scores equal ``scores`` (to 1e-12).

    With unit gradient norms and ``out_norm = 1``, ``scores = -contrib / (1 + 1e-12)``.
    """
    n = scores.shape[0]
    grad = torch.zeros(n, 3, dtype=scores.dtype)
    grad[:, 0] = 1.0
    contrib = -scores * (1 + 1e-12)
    return router.decide(contrib, grad, torch.ones(n, dtype=scores.dtype), routed, mode)


# -- assign: the four policies ---------------------------------------------------------------


@SETTINGS
@given(n=st.integers(1, 12), k=st.integers(1, 6), data=st.data(), seed=st.integers(0, 10**6))
def test_topk_picks_the_highest_biased_scores(n, k, data, seed):
    top_k = data.draw(st.integers(1, k))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, k, generator=gen, dtype=F64)
    router = BackwardRouter(k, policy="topk", top_k=top_k)
    router.bias.copy_(torch.randn(k, generator=gen))
    keep = router.assign(scores)
    biased = scores + router.bias.double()
    for t in range(n):
        best = sorted(range(k), key=lambda j: -float(biased[t, j]))[:top_k]
        expected = torch.zeros(k, dtype=F64)
        expected[best] = 1.0
        assert torch.equal(keep[t], expected), (t, biased[t], keep[t])


def test_topk_bias_changes_the_choice():
    router = BackwardRouter(3, policy="topk")
    scores = torch.tensor([[0.5, 0.4, -1.0]], dtype=F64)
    assert router.assign(scores).tolist() == [[1.0, 0.0, 0.0]]
    router.bias.copy_(torch.tensor([0.0, 0.2, 0.0]))
    assert router.assign(scores).tolist() == [[0.0, 1.0, 0.0]]


@SETTINGS
@given(
    n=st.integers(1, 14),
    k=st.integers(1, 5),
    data=st.data(),
    capacity_factor=st.sampled_from([0.3, 0.5, 1.0, 1.25, 2.0, 10.0]),
    temperature=st.sampled_from([0.1, 0.5, 1.0]),
    seed=st.integers(0, 10**6),
)
def test_expert_choice_capacity_and_top_affinity(n, k, data, capacity_factor, temperature, seed):
    top_k = data.draw(st.integers(1, k))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, k, generator=gen, dtype=F64)
    router = BackwardRouter(
        k,
        policy="expert_choice",
        top_k=top_k,
        capacity_factor=capacity_factor,
        temperature=temperature,
    )
    router.bias.copy_(0.3 * torch.randn(k, generator=gen))
    keep = router.assign(scores)
    capacity = min(n, math.ceil(capacity_factor * n * top_k / k))
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    assert keep.sum(dim=0).tolist() == [float(capacity)] * k
    # by hand: softmax over experts of the biased scores, per token
    biased = (scores + router.bias.double()) / temperature
    affinity = biased.exp() / biased.exp().sum(dim=1, keepdim=True)
    for j in range(k):
        chosen = keep[:, j] == 1
        if not (~chosen).any():
            continue
        assert affinity[chosen, j].min() >= affinity[~chosen, j].max(), (j, affinity, keep)
        ranked = sorted(range(n), key=lambda t, j=j: -float(affinity[t, j]))
        if affinity[ranked[capacity - 1], j] > affinity[ranked[capacity], j]:  # no tie
            assert sorted(ranked[:capacity]) == chosen.nonzero().flatten().tolist()


def test_expert_choice_capacity_by_hand():
    scores = torch.randn(5, 2, dtype=F64)
    router = BackwardRouter(2, policy="expert_choice")  # ceil(1 * 5 * 1 / 2) = 3
    assert router.assign(scores).sum(dim=0).tolist() == [3.0, 3.0]
    router = BackwardRouter(2, policy="expert_choice", capacity_factor=10.0)  # min(5, 25)
    assert torch.equal(router.assign(scores), torch.ones(5, 2, dtype=F64))


def test_expert_choice_may_drop_tokens_and_counts_them():
    # K=3, n=3, capacity 1: token 0 is the best choice of experts 0 and 1, token 2 of
    # expert 2, so token 1 gets no expert (dropped)
    router = BackwardRouter(3, policy="expert_choice", capacity_factor=1.0, correct_harmful=False)
    scores = torch.tensor([[1.0, 1.0, -9.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.5]], dtype=F64)
    keep, _ = _decide_scores(router, scores, torch.ones(3, dtype=torch.bool))
    assert keep.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    assert float(router.dropped_tokens) == 1
    assert router.load.tolist() == [1, 1, 1]
    assert float(router.routed_tokens) == 3


@SETTINGS
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 8),
    temperature=st.sampled_from([0.1, 0.3, 1.0]),
    seed=st.integers(0, 10**6),
)
def test_sinkhorn_marginals(n, k, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    # scores / temperature ~ N(0, 3^2) at most: alignment-sized scores (cosines, |s| <~ 1).
    # Much sharper kernels are near permutations, where Sinkhorn converges very slowly.
    scores = 0.3 * torch.randn(n, k, generator=gen, dtype=F64)
    tol = 1e-6
    plan, used = sinkhorn(scores, temperature, iters=2000, tol=tol)
    assert used < 2000, "did not converge"
    assert plan.dtype == F64 and (plan >= 0).all()
    # rows: within tol (relative) of 1/n; columns: exact after the last column step
    assert ((plan.sum(dim=1) * n - 1).abs() <= tol).all()
    assert ((plan.sum(dim=0) * k - 1).abs() <= 1e-12).all()
    # it is the Sinkhorn solution: log plan = score / temperature + a_i + b_j
    resid = plan.log() - scores / temperature
    resid = resid - resid[:, :1] - resid[:1, :] + resid[0, 0]
    assert resid.abs().max() < 1e-8


def test_sinkhorn_stops_at_tolerance():
    scores = torch.randn(30, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    _, loose = sinkhorn(scores, 0.1, iters=1000, tol=1e-2)
    _, tight = sinkhorn(scores, 0.1, iters=1000, tol=1e-8)
    assert 1 <= loose < tight < 1000
    _, capped = sinkhorn(scores, 0.1, iters=3, tol=1e-12)
    assert capped == 3


def _sinkhorn_reference(scores, temperature, iters, tol):
    """The first implementation (row logsumexp computed twice per iteration)."""
    n, k = scores.shape
    log_p = scores.double() / temperature
    log_r, log_c = -math.log(n), -math.log(k)
    used = 0
    for used in range(1, iters + 1):  # noqa: B007
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True) + log_r
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + log_c
        row_err = (torch.logsumexp(log_p, dim=1) - log_r).exp().sub(1).abs().max()
        if float(row_err) < tol:
            break
    return log_p.exp().to(scores.dtype), used


@pytest.mark.parametrize("sharpness", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("tol", [1e-3, 1e-8])
def test_sinkhorn_reuses_row_sums_bit_for_bit(sharpness, tol):
    """One row logsumexp per iteration instead of two: the same plan, the same bits."""
    gen = torch.Generator().manual_seed(3)
    scores = sharpness * torch.randn(200, 8, generator=gen)
    scores[:, 0] += 2 * sharpness  # sharp: most tokens prefer expert 0
    plan, used = sinkhorn(scores, 0.1, 100, tol)
    ref, ref_used = _sinkhorn_reference(scores, 0.1, 100, tol)
    assert used == ref_used
    assert torch.equal(plan, ref)


def test_sinkhorn_float32_is_bounded_and_balanced():
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(256, 4, generator=gen)
    plan, used = sinkhorn(scores, 0.1, iters=100, tol=1e-3, dtype=torch.float32)
    ref, _ = sinkhorn(scores, 0.1, iters=100, tol=1e-3)
    assert plan.dtype == scores.dtype and 1 <= used <= 100
    assert ((plan.sum(dim=0) * 4 - 1).abs() < 1e-4).all()
    assert (plan - ref).abs().max() < 1e-5


@SETTINGS
@given(n=st.integers(1, 20), k=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_balanced_takes_the_argmax_of_the_biased_plan(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, k, generator=gen, dtype=F64)
    router = BackwardRouter(k, policy="balanced", temperature=0.2)
    router.bias.copy_(0.1 * torch.randn(k, generator=gen))
    keep = router.assign(scores)
    plan, _ = sinkhorn(scores + router.bias.double(), 0.2, router.sinkhorn_iters, 1e-3)
    assert keep.sum(dim=1).tolist() == [1.0] * n
    assert keep.argmax(dim=1).tolist() == plan.argmax(dim=1).tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_evens_out_skewed_scores(seed):
    gen = torch.Generator().manual_seed(seed)
    n, k = 64, 4
    scores = 0.1 * torch.randn(n, k, generator=gen, dtype=F64)
    scores[:, 0] += 0.5  # every token prefers expert 0
    topk = BackwardRouter(k, policy="topk").assign(scores).sum(dim=0)
    balanced = BackwardRouter(k, policy="balanced").assign(scores).sum(dim=0)
    assert topk.tolist() == [64.0, 0.0, 0.0, 0.0]
    assert balanced.sum() == n
    assert _cv(balanced) < 0.25 < _cv(topk)


def test_all_policy_returns_ones():
    router = BackwardRouter(3, policy="all")
    scores = torch.randn(5, 3, dtype=F64)
    assert torch.equal(router.assign(scores), torch.ones(5, 3, dtype=F64))
    for policy in POLICIES:
        empty = BackwardRouter(3, policy=policy).assign(torch.zeros(0, 3))
        assert empty.shape == (0, 3)


# -- decide: routed rows, bookkeeping, bias balancing ----------------------------------------


def test_decide_assigns_routed_rows_only_and_records_stats():
    router = BackwardRouter(3, policy="topk", n_modes=4).double()
    scores = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=F64
    )
    routed = torch.tensor([True, False, True, True])
    mode = torch.tensor([0, -1, 2, 2])
    keep, amplified = _decide_scores(router, scores, routed, mode)
    assert amplified is None
    assert keep.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 1], [0, 1, 0]]
    assert router.load.tolist() == [1, 1, 1]
    assert float(router.routed_tokens) == 3 and float(router.dropped_tokens) == 0
    assert router.mode_load.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1], [0, 0, 0]]
    probs = torch.softmax(scores[routed] / router.temperature, dim=1)
    entropy = -(probs * probs.log()).sum()
    assert float(router.entropy_sum) == pytest.approx(float(entropy), rel=1e-5)
    none, _ = _decide_scores(router, scores, torch.zeros(4, dtype=torch.bool))
    assert none is None  # nothing routed: every expert takes every gradient
    router.reset_stats()
    assert float(router.load.sum() + router.mode_load.sum() + router.routed_tokens) == 0


def test_decide_with_modes_accepts_other_dtypes():
    """A float32 router fed float64 (or autocast bf16) gradients must still count modes."""
    router = BackwardRouter(2, policy="topk", n_modes=2)
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    _decide_scores(router, scores, torch.tensor([True, True]), torch.tensor([0, 1]))
    assert router.mode_load.tolist() == [[1, 0], [0, 1]]


def test_bias_balancing_evens_out_a_preferred_expert():
    k, n, steps = 4, 32, 60
    gen = torch.Generator().manual_seed(0)
    balancing = BackwardRouter(k, policy="topk", bias_rate=0.02, correct_harmful=False)
    control = BackwardRouter(k, policy="topk", bias_rate=0.0, correct_harmful=False)
    routed = torch.ones(n, dtype=torch.bool)
    bias0, cvs, control_cvs = [], [], []
    for _ in range(steps):
        scores = 0.05 * torch.randn(n, k, generator=gen, dtype=F64)
        scores[:, 0] += 0.3  # persistently preferred
        keep, _ = _decide_scores(balancing, scores, routed)
        ctrl, _ = _decide_scores(control, scores, routed)
        bias0.append(float(balancing.bias[0]))
        cvs.append(_cv(keep.sum(dim=0)))
        control_cvs.append(_cv(ctrl.sum(dim=0)))
    assert torch.equal(control.bias, torch.zeros(k))
    # step 1: all tokens on expert 0 (cv = sqrt(K - 1)); its bias drops by bias_rate,
    # the others' rise by it
    assert cvs[0] == pytest.approx(math.sqrt(3))
    assert bias0[0] == pytest.approx(-0.02)
    assert balancing.bias[0] < 0 < balancing.bias[1:].min()
    assert bias0[20] < bias0[5] < bias0[0]
    assert sum(cvs[-10:]) / 10 < 0.5 * cvs[0]
    assert sum(control_cvs[-10:]) / 10 == pytest.approx(math.sqrt(3))


def test_bias_stays_put_when_the_load_is_already_even():
    # expert choice fills every expert to capacity: nothing to correct
    router = BackwardRouter(4, policy="expert_choice", bias_rate=0.02)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.randn(16, 4, generator=gen, dtype=F64)
        scores[:, 0] += 1.0
        _decide_scores(router, scores, torch.ones(16, dtype=torch.bool))
    assert torch.equal(router.bias, torch.zeros(4))
    assert router.load.tolist() == [20.0] * 4


# -- scores: the backward alignment definition -----------------------------------------------

D_IN, D_OUT, WIDTH, K = 5, 4, 12, 4
LABELS = [FORGET, FORGET, UNLABELED, RETAIN, FORGET, UNLABELED, FORGET, RETAIN, UNLABELED, FORGET]


def _experts(seed=0, width=WIDTH, k=K):
    torch.manual_seed(seed)
    experts = FusedExperts(D_IN, D_OUT, width, k, init_std=0.5).double()
    with torch.no_grad():
        experts.up_bias.normal_(0, 0.5)
    return experts


def _expert_out(experts, x, k):
    """Expert ``k``'s output from its own slices, with plain ops."""
    s = experts.expert_slice(k)
    h = experts.act(x @ experts.up[s].t() + experts.up_bias[s])
    return h @ experts.down[:, s].t()


def _inputs(seed, labels=LABELS):
    gen = torch.Generator().manual_seed(seed + 100)
    n = len(labels)
    x = torch.randn(n, D_IN, generator=gen, dtype=F64)
    grad_out = torch.randn(n, D_OUT, generator=gen, dtype=F64)
    plan = make_plan(torch.tensor(labels), "sgtm", dtype=F64)
    return x, grad_out, plan


@pytest.mark.parametrize("seed", [0, 1])
def test_output_alignment_sums_to_cosine_with_the_quarantine_output(monkeypatch, seed):
    experts = _experts(seed)
    router = BackwardRouter(K, policy="topk")
    captured = _spy(monkeypatch, router, "scores")
    x, grad_out, plan = _inputs(seed)
    (experts(x, plan, router) * grad_out).sum().backward()
    (scores,) = captured
    on = plan.quarantine_on
    g = grad_out * on
    parts = torch.stack([_expert_out(experts, x, k) for k in range(K)], dim=1).detach()
    y = parts.sum(dim=1)
    live = on.squeeze(1) == 1
    cos = torch.nn.functional.cosine_similarity(-g, y, dim=1)
    assert_close(scores.sum(dim=1)[live], cos[live], rtol=0, atol=1e-12)
    by_hand = -(parts * g[:, None, :]).sum(dim=2) / (g.norm(dim=1) * y.norm(dim=1))[:, None]
    assert_close(scores[live], by_hand[live], rtol=0, atol=1e-12)
    assert (scores[~live] == 0).all()  # retain tokens: no gradient, no preference


def test_output_alignment_ignores_gradient_scale(monkeypatch):
    experts = _experts(0)
    router = BackwardRouter(K, policy="topk")
    captured = _spy(monkeypatch, router, "scores")
    x, grad_out, plan = _inputs(0)
    scale = torch.logspace(-3, 3, len(LABELS), dtype=F64)[:, None]
    (experts(x, plan, router) * grad_out).sum().backward()
    (experts(x, plan, router) * grad_out * scale).sum().backward()
    # only the 1e-12 guard in the denominator is not scale invariant
    assert_close(captured[0], captured[1], rtol=0, atol=1e-9)


def test_prototype_alignment_moves_unit_prototypes_toward_assigned_gradients():
    k, d, decay = 3, 5, 0.8
    router = BackwardRouter(
        k,
        policy="topk",
        alignment="prototype",
        d_model=d,
        prototype_decay=decay,
        correct_harmful=False,
    ).double()
    gen = torch.Generator().manual_seed(3)
    n = 12
    grad = torch.randn(n, d, generator=gen, dtype=F64)
    routed = torch.rand(n, generator=gen) < 0.7
    routed[:4] = True
    before = router.prototypes.clone()
    assert_close(before.norm(dim=1), torch.ones(k, dtype=F64))
    direction = -grad / grad.norm(dim=1, keepdim=True)
    scores = router.scores(torch.zeros(n, k, dtype=F64), grad, torch.ones(n, dtype=F64))
    assert_close(scores, direction @ before.t(), rtol=0, atol=1e-10)
    keep, _ = router.decide(
        torch.zeros(n, k, dtype=F64), grad, torch.ones(n, dtype=F64), routed, None
    )
    after = router.prototypes
    assert_close(after.norm(dim=1), torch.ones(k, dtype=F64), rtol=0, atol=1e-12)
    moved = 0
    for j in range(k):
        mine = routed & (keep[:, j] == 1)
        if not mine.any():
            assert torch.equal(after[j], before[j])
            continue
        moved += 1
        mean = direction[mine].mean(dim=0)
        expected = decay * before[j] + (1 - decay) * mean
        assert_close(after[j], expected / expected.norm(), rtol=0, atol=1e-12)
        cos_before = torch.dot(before[j], mean) / mean.norm()
        cos_after = torch.dot(after[j], mean) / mean.norm()
        assert cos_after > cos_before
    assert moved >= 1


def test_prototype_converges_to_a_persistent_gradient_direction():
    router = BackwardRouter(2, policy="topk", alignment="prototype", d_model=4).double()
    target = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=F64)
    target = target / target.norm()
    gen = torch.Generator().manual_seed(0)
    for _ in range(80):
        grad = -(target + 0.05 * torch.randn(8, 4, generator=gen, dtype=F64))
        router.decide(
            torch.zeros(8, 2, dtype=F64),
            grad,
            torch.ones(8, dtype=F64),
            torch.ones(8, dtype=torch.bool),
            None,
        )
    assert float((router.prototypes @ target).max()) > 0.99


# -- FusedExperts under a router: exact per-(token, expert) gradients -------------------------

ROUTER_CASES = [
    ("topk", 1, 1.0),
    ("topk", 2, 1.0),
    ("expert_choice", 1, 1.0),
    ("expert_choice", 2, 0.5),
    ("balanced", 1, 1.0),
]


def _reference_grads(experts, x, grad_out, on, keep, gate=None):
    """Sum over (token, expert) pairs with ``keep == 1`` of d(y_k[t] . G[t]) / d params."""
    params = (experts.up, experts.up_bias, experts.down)
    total = [torch.zeros_like(p) for p in params]
    for t in range(x.shape[0]):
        for k in range(experts.n_experts):
            if keep[t, k] != 1:
                continue
            out = on[t] * _expert_out(experts, x[t : t + 1], k)
            if gate is not None:
                out = out * gate[t, k].detach()
            grads = torch.autograd.grad((out * grad_out[t]).sum(), params)
            for acc, g in zip(total, grads, strict=True):
                acc += g
    return total


@pytest.mark.parametrize("correct", [False, True])
@pytest.mark.parametrize("use_gate", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("policy", "top_k", "capacity_factor"), ROUTER_CASES)
def test_fused_experts_gradients_follow_the_router_exactly(
    monkeypatch, policy, top_k, capacity_factor, seed, use_gate, correct
):
    experts = _experts(seed)
    router = BackwardRouter(
        K, policy=policy, top_k=top_k, capacity_factor=capacity_factor, correct_harmful=correct
    )
    decisions = _spy(monkeypatch, router, "decide")
    x, grad_out, plan = _inputs(seed)
    x.requires_grad_(True)
    residual = torch.randn(len(LABELS), D_OUT, dtype=F64, requires_grad=True)
    gate = None
    if use_gate:
        gen = torch.Generator().manual_seed(seed)
        gate = (0.5 + torch.rand(len(LABELS), K, generator=gen, dtype=F64)).requires_grad_(True)
    y = experts(x, plan, router, residual=residual, gate=gate)
    (y * grad_out).sum().backward()
    ((keep, amplified),) = decisions
    routed = plan.routed
    assert amplified is None
    assert (keep[~routed] == 1).all()  # non-routed tokens: all experts
    restricted = bool((keep[routed] == 0).any())
    if not correct or top_k == 1:
        assert restricted  # the router did restrict something
    on = plan.quarantine_on.squeeze(1)

    # forward: the plain sum of all experts, whatever the routing
    x_ref = x.detach().clone().requires_grad_(True)
    gate_ref = None if gate is None else gate.detach().clone().requires_grad_(True)
    parts = torch.stack([_expert_out(experts, x_ref, k) for k in range(K)], dim=1)
    if gate_ref is not None:
        parts = parts * gate_ref[:, :, None]
    y_ref = residual.detach() + on[:, None] * parts.sum(dim=1)
    assert_close(y.detach(), y_ref.detach(), rtol=0, atol=1e-12)

    # the decision is the policy applied to the alignment of the routed tokens
    g = grad_out * on[:, None]
    scores = -(parts.detach() * g[:, None, :]).sum(dim=2)
    scores = scores / (g.norm(dim=1) * parts.detach().sum(dim=1).norm(dim=1))[:, None]
    fresh = BackwardRouter(K, policy=policy, top_k=top_k, capacity_factor=capacity_factor)
    expected_keep = fresh.assign(scores[routed])
    if correct:  # experts that raise the token's loss take its gradient too
        expected_keep = torch.maximum(expected_keep, (scores[routed] < 0).to(F64))
    assert torch.equal(keep[routed], expected_keep)

    # parameter gradients: only the kept (token, expert) pairs
    expected = _reference_grads(experts, x.detach(), grad_out, on, keep, gate)
    for name, p, e in zip(("up", "up_bias", "down"), experts.parameters(), expected, strict=True):
        assert_close(p.grad, e, rtol=0, atol=1e-12, msg=name)
    unrouted = _reference_grads(experts, x.detach(), grad_out, on, torch.ones_like(keep), gate)
    assert torch.allclose(experts.down.grad, unrouted[2]) != restricted

    # activation gradients are the ordinary ones
    (y_ref * grad_out).sum().backward()
    assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    assert_close(residual.grad, grad_out, rtol=0, atol=0)
    if gate is not None:
        assert_close(gate.grad, gate_ref.grad, rtol=0, atol=1e-12)
    plain = copy.deepcopy(experts)
    x_plain = x.detach().clone().requires_grad_(True)
    plain_gate = None if gate is None else gate.detach()
    (plain(x_plain, plan, None, gate=plain_gate) * grad_out).sum().backward()
    assert_close(x.grad, x_plain.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["gelu", "silu", "identity", "relu"])
@pytest.mark.parametrize("use_gate", [False, True])
def test_routed_expert_backward_is_autograd_bit_for_bit(activation, use_gate):
    """The routed backward calls the activations' own backward kernels directly; the
    gradients are the bits of the generic path (a second autograd graph)."""
    results = []
    for generic in (False, True):
        experts = _experts(3)
        experts.act = ACTIVATIONS[activation]
        if generic:  # an activation the backward does not know: the autograd path
            experts.act = lambda t, f=ACTIVATIONS[activation]: f(t)
        router = BackwardRouter(K, policy="topk")
        x, grad_out, plan = _inputs(3)
        x.requires_grad_(True)
        gate = None
        if use_gate:
            gen = torch.Generator().manual_seed(5)
            gate = (0.5 + torch.rand(len(LABELS), K, generator=gen, dtype=F64)).requires_grad_()
        y = experts(x, plan, router, gate=gate)
        (y * grad_out).sum().backward()
        grads = [p.grad for p in experts.parameters()] + [x.grad]
        results.append(grads + ([gate.grad] if gate is not None else []))
    for fast, slow in zip(*results, strict=True):
        assert torch.equal(fast, slow)


@pytest.mark.parametrize(("policy", "top_k", "capacity_factor"), ROUTER_CASES)
def test_a_routed_token_reaches_exactly_its_assigned_experts(
    monkeypatch, policy, top_k, capacity_factor
):
    for t0 in (0, 4, 9):  # routed (forget) tokens
        experts = _experts(t0)
        router = BackwardRouter(K, policy=policy, top_k=top_k, capacity_factor=capacity_factor)
        decisions = _spy(monkeypatch, router, "decide")
        x, grad_out, plan = _inputs(t0)
        assert bool(plan.routed[t0])
        only = torch.zeros_like(grad_out)
        only[t0] = grad_out[t0]
        (experts(x, plan, router) * only).sum().backward()
        keep = decisions[-1][0]
        for k in range(K):
            s = experts.expert_slice(k)
            slices = (experts.up.grad[s], experts.up_bias.grad[s], experts.down.grad[:, s])
            reached = [bool((part != 0).any()) for part in slices]
            assert reached == [bool(keep[t0, k] == 1)] * 3, (t0, k, keep[t0])


# -- forward invariance in the testbed ---------------------------------------------------------


def _testbed(policy, base=None):
    cfg = tb.TestbedConfig(
        vocab_size=32,
        seq_len=6,
        d_model=8,
        n_layer=2,
        n_head=2,
        mlp_width=16,
        quarantine_width=8,
        n_experts=4,
        router=RouterConfig(policy=policy),
    )
    torch.manual_seed(0)
    model = tb.Testbed(cfg).double()
    if base is not None:
        model.load_state_dict(base.state_dict(), strict=False)
    else:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=F64))
    return model


def test_testbed_forward_and_input_gradients_do_not_depend_on_the_policy():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 32, (3, 7), generator=gen)
    route = torch.randint(0, 3, (3, 6), generator=gen)
    route[0, 0] = FORGET
    mode = torch.where(route == FORGET, torch.randint(0, 3, (3, 6), generator=gen), -1)
    base = _testbed("all")
    results = {}
    for policy in POLICIES:
        model = base if policy == "all" else _testbed(policy, base)
        for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters(), strict=True):
            assert torch.equal(p, q), n
        seen = []

        def keep_input(_module, args, seen=seen):
            args[0].retain_grad()
            seen.append(args[0])

        hook = model.blocks[0].register_forward_pre_hook(keep_input)
        logits = model(tokens[:, :-1], route=route, mode=mode)
        tb.lm_loss(logits, tokens[:, 1:]).backward()
        hook.remove()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[policy] = (logits.detach(), seen[0].grad.clone(), grads)
        if policy != "all":
            assert float(model.blocks[0].mlp.router.routed_tokens) == int((route == FORGET).sum())
    logits0, dx0, grads0 = results["all"]
    for policy in POLICIES[1:]:
        logits, dx, grads = results[policy]
        assert_close(logits, logits0, rtol=0, atol=1e-12)
        assert_close(dx, dx0, rtol=0, atol=1e-12)
        for name, g in grads.items():
            if ".mlp.experts." in name:
                continue
            assert_close(g, grads0[name], rtol=0, atol=1e-12, msg=name)
        # the routing does act on the quarantine experts' gradients
        assert not torch.allclose(
            grads["blocks.0.mlp.experts.down"], grads0["blocks.0.mlp.experts.down"]
        )


# -- the amplifier ---------------------------------------------------------------------------


def _bank(router_cfg, shared_expert_width=4):
    d, width = D_OUT, 8
    torch.manual_seed(0)
    bank = InjectedMLP(
        d, 6, width, K, shared_expert_width=shared_expert_width, router=router_cfg, init_std=0.5
    ).double()
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return bank


AMP_LABELS = [FORGET, UNLABELED, UNLABELED, RETAIN, UNLABELED, UNLABELED, FORGET, UNLABELED]


def _amplifier_case(labels, threshold):
    """Inputs whose unlabeled gradients are aligned (-y), opposed (+y) or random."""
    bank = _bank(RouterConfig(policy="topk", amplify=True, amplify_threshold=threshold))
    gen = torch.Generator().manual_seed(5)
    n = len(labels)
    x = torch.randn(n, D_OUT, generator=gen, dtype=F64)
    with torch.no_grad():
        y_q = bank.experts(x, make_plan(None))  # the summed quarantine output
    grad_out = torch.randn(n, D_OUT, generator=gen, dtype=F64)
    kinds = ["aligned", "opposed", "random"]
    for i, t in enumerate(t for t, lab in enumerate(labels) if lab == UNLABELED):
        kind = kinds[i % 3]
        if kind == "aligned":
            grad_out[t] = -2.0 * y_q[t]
        elif kind == "opposed":
            grad_out[t] = y_q[t]
    cos = torch.nn.functional.cosine_similarity(-grad_out, y_q, dim=1)
    expected = (torch.tensor(labels) == UNLABELED) & (cos > threshold)
    return bank, x, grad_out, expected


def _run_bank(bank, x, grad_out, labels):
    x = x.clone().requires_grad_(True)
    bank.zero_grad(set_to_none=True)
    plan = make_plan(torch.tensor(labels), "sgtm", dtype=F64)
    (bank(x, plan) * grad_out).sum().backward()
    grads = {n: p.grad.clone() for n, p in bank.named_parameters()}
    return grads, x.grad


@pytest.mark.parametrize("threshold", [0.5, -0.5])
@pytest.mark.parametrize("labels", [AMP_LABELS, [UNLABELED, RETAIN, UNLABELED, UNLABELED]])
def test_amplified_tokens_leave_the_shared_path_like_forget_tokens(monkeypatch, labels, threshold):
    # a negative threshold must still skip retain tokens (no gradient, alignment 0)
    bank, x, grad_out, expected = _amplifier_case(labels, threshold)
    n_unlabeled = sum(lab == UNLABELED for lab in labels)
    assert 1 <= int(expected.sum()) < n_unlabeled
    decisions = _spy(monkeypatch, bank.router, "decide")
    grads, dx = _run_bank(bank, x, grad_out, labels)
    ((_keep, amplified),) = decisions
    assert torch.equal(amplified, expected)
    assert float(bank.router.amplified_tokens) == int(expected.sum())

    # reference: the same bank without the amplifier, the amplified tokens labelled forget
    relabelled = [FORGET if bool(a) else lab for lab, a in zip(labels, expected, strict=True)]
    reference = _bank(RouterConfig(policy="topk"))
    reference.load_state_dict(bank.state_dict())
    ref_grads, ref_dx = _run_bank(reference, x, grad_out, relabelled)
    for name, g in grads.items():
        assert_close(g, ref_grads[name], rtol=0, atol=1e-12, msg=name)
    assert_close(dx, ref_dx, rtol=0, atol=1e-12)

    # control: without the amplifier and with the original labels the core does learn them
    plain = _bank(RouterConfig(policy="topk"))
    plain.load_state_dict(bank.state_dict())
    plain_grads, plain_dx = _run_bank(plain, x, grad_out, labels)
    core_up = "mlp.base_layer.up.base_layer.weight"
    assert not torch.allclose(plain_grads[core_up], grads[core_up])
    assert_close(dx, plain_dx, rtol=0, atol=1e-12)


def test_an_amplified_token_gives_zero_gradient_to_the_core_and_shared_expert():
    threshold = 0.5
    bank, x, grad_out, expected = _amplifier_case(AMP_LABELS, threshold)
    t0 = int(expected.nonzero()[0])
    only = torch.zeros_like(grad_out)
    only[t0] = grad_out[t0]
    grads, _ = _run_bank(bank, x, only, AMP_LABELS)
    shared = [n for n in grads if n.startswith(("mlp.base_layer.", "mlp.shared."))]
    assert len(shared) == 8
    for name in shared:
        assert (grads[name] == 0).all(), name
    assert (grads["mlp.experts.down"] != 0).any()
    plain = _bank(RouterConfig(policy="topk"))
    plain.load_state_dict(bank.state_dict())
    plain_grads, _ = _run_bank(plain, x, only, AMP_LABELS)
    assert all((plain_grads[name] != 0).any() for name in shared)


def test_router_config_build():
    assert RouterConfig().build(4, 8) is None
    router = RouterConfig(policy="all", amplify=True, amplify_threshold=0.3).build(4, 8)
    assert router is not None and router.amplify_threshold == 0.3
    assert RouterConfig(policy="topk").build(4, 8).amplify_threshold is None
    with pytest.raises(ValueError, match="top_k"):
        RouterConfig(policy="topk", top_k=3).build(2, 8)
    for bad in (dict(policy="nope"), dict(temperature=0.0), dict(bias_rate=-1.0)):
        with pytest.raises(ValueError):
            RouterConfig(**bad)


# -- controls (random, oracle) and the correction of harmful experts -------------------------


def test_oracle_sends_forget_mode_m_to_expert_m_minus_one():
    router = BackwardRouter(4, policy="oracle", n_modes=8, correct_harmful=False).double()
    scores = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    mode = torch.tensor([1, 2, 3, 4, 5, -1])
    keep, _ = _decide_scores(router, scores, torch.ones(6, dtype=torch.bool), mode)
    expected = torch.zeros(6, 4, dtype=F64)
    for row, expert in enumerate([0, 1, 2, 3, 0]):
        expected[row, expert] = 1
    expected[5] = 1  # no mode: every expert
    assert torch.equal(keep, expected)


def test_random_assignment_ignores_scores_is_uniform_and_resumes_exactly():
    k, n = 4, 4000
    router = BackwardRouter(k, policy="random", seed=3, correct_harmful=False).double()
    scores = torch.zeros(n, k, dtype=F64)
    scores[:, 0] = 1.0  # every token prefers expert 0: random must not care
    keep, _ = _decide_scores(router, scores, torch.ones(n, dtype=torch.bool))
    assert torch.equal(keep.sum(dim=1), torch.ones(n, dtype=F64))
    share = keep.sum(dim=0) / n
    assert float((share - 1 / k).abs().max()) < 0.03  # binomial sd 0.007
    # the draw depends on (seed, number of earlier calls), both in the state dict
    state = copy.deepcopy(router.state_dict())
    first, _ = _decide_scores(router, scores[:50], torch.ones(50, dtype=torch.bool))
    resumed = BackwardRouter(k, policy="random", seed=3, correct_harmful=False).double()
    resumed.load_state_dict(state)
    again, _ = _decide_scores(resumed, scores[:50], torch.ones(50, dtype=torch.bool))
    assert torch.equal(first, again)
    second, _ = _decide_scores(router, scores[:50], torch.ones(50, dtype=torch.bool))
    assert not torch.equal(first, second)


def test_correction_gives_harmful_experts_the_gradient_and_counts_it():
    router = BackwardRouter(3, policy="topk", correct_harmful=True).double()
    scores = torch.tensor([[0.5, -0.2, 0.1], [0.1, 0.3, 0.2], [-0.1, -0.3, 0.4]], dtype=F64)
    routed = torch.tensor([True, True, False])
    keep, _ = _decide_scores(router, scores, routed)
    # token 0: top-1 is expert 0, expert 1 hurts it; token 1: top-1 only; token 2 not routed
    assert keep.tolist() == [[1, 1, 0], [0, 1, 0], [1, 1, 1]]
    assert float(router.corrected_pairs) == 1
    assert router.load.tolist() == [1, 1, 0]  # loads count the assignment only

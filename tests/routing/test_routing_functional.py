"""Per-token masked ops against brute-force per-row references.

Documented rule: the parameter gradient of a routed op only sums the rows (token
positions) whose ``keep`` is 1 (per group of features for ``[N, G]`` masks); activation
cotangents flow unchanged. The references below run one separate backward pass per row
and add up the kept rows' parameter gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from evil_moe.models.gpt import RMSNorm
from evil_moe.routing.functional import (
    mask_cotangent,
    routed_linear,
    routed_module_call,
)

EXACT = dict(rtol=1e-12, atol=1e-12)
F64 = torch.float64


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def _keep(gen, n, groups, p=0.5):
    return (torch.rand(n, groups, generator=gen, dtype=F64) < p).to(F64)


def _group_mask(flags: torch.Tensor, features: int) -> torch.Tensor:
    """One row's ``[G]`` flags to a ``[features]`` 0/1 vector (G equal contiguous blocks)."""
    return flags.repeat_interleave(features // flags.numel())


def per_row_linear_reference(x, w, b, cot, out_keep, in_keep):
    """Sum over rows of each row's own (w, b) gradient, masked by that row's flags."""
    gw = torch.zeros_like(w)
    gb = torch.zeros_like(b) if b is not None else None
    gx = torch.zeros_like(x)
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach().requires_grad_()
        wi = w.detach().requires_grad_()
        bi = b.detach().requires_grad_() if b is not None else None
        contrib = (F.linear(xi, wi, bi) * cot[i : i + 1]).sum()
        inputs = [xi, wi] + ([bi] if bi is not None else [])
        row_grads = torch.autograd.grad(contrib, inputs)
        gx[i] = row_grads[0][0]
        rw = row_grads[1]
        out_m = _group_mask(out_keep[i], w.shape[0]) if out_keep is not None else None
        in_m = _group_mask(in_keep[i], w.shape[1]) if in_keep is not None else None
        if out_m is not None:
            rw = rw * out_m[:, None]
        if in_m is not None:
            rw = rw * in_m[None, :]
        gw += rw
        if b is not None:
            rb = row_grads[2]
            gb += rb * out_m if out_m is not None else rb
    return gx, gw, gb


def fast_linear_grads(x, w, b, cot, out_keep, in_keep, lead=None):
    xs = x.detach().clone().requires_grad_()
    ws = w.detach().clone().requires_grad_()
    bs = b.detach().clone().requires_grad_() if b is not None else None
    xin = xs if lead is None else xs.view(*lead, x.shape[-1])
    y = routed_linear(xin, ws, bs, out_keep, in_keep)
    assert y.shape[:-1] == xin.shape[:-1]
    assert_close(y.reshape(-1, w.shape[0]), F.linear(x, w, b), **EXACT)
    (y.reshape(-1, w.shape[0]) * cot).sum().backward()
    return xs.grad, ws.grad, (bs.grad if bs is not None else None)


@st.composite
def linear_cases(draw):
    n = draw(st.integers(1, 7))
    groups = draw(st.sampled_from([1, 2, 4]))
    d_in = draw(st.sampled_from([4, 8, 12]))
    d_out = draw(st.sampled_from([4, 8, 16, 24]))
    out_groups = draw(st.sampled_from([1, 2, 4]))
    kind = draw(st.sampled_from(["out", "in", "both", "none"]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return n, groups, out_groups, d_in, d_out, kind, bias, seed


@settings(max_examples=30, deadline=None)
@given(linear_cases())
def test_routed_linear_matches_per_row_reference(case):
    n, groups, out_groups, d_in, d_out, kind, bias, seed = case
    gen = torch.Generator().manual_seed(seed)
    x, w, cot = _rand(gen, n, d_in), _rand(gen, d_out, d_in), _rand(gen, n, d_out)
    b = _rand(gen, d_out) if bias else None
    out_keep = _keep(gen, n, out_groups) if kind in ("out", "both") else None
    in_keep = _keep(gen, n, groups) if kind in ("in", "both") else None
    gx, gw, gb = fast_linear_grads(x, w, b, cot, out_keep, in_keep)
    rx, rw, rb = per_row_linear_reference(x, w, b, cot, out_keep, in_keep)
    assert_close(gx, rx, **EXACT)  # activation cotangent is never masked
    assert_close(gw, rw, **EXACT)
    if bias:
        assert_close(gb, rb, **EXACT)


@pytest.mark.parametrize(("d_in", "d_out"), [(4, 16), (16, 4), (8, 8)])
def test_routed_linear_token_mask_both_branches(d_in, d_out):
    """``out_keep [N, 1]`` masks the narrower side internally; both sides must agree."""
    gen = torch.Generator().manual_seed(d_in * 100 + d_out)
    n = 6
    x, w, b, cot = (
        _rand(gen, n, d_in),
        _rand(gen, d_out, d_in),
        _rand(gen, d_out),
        _rand(gen, n, d_out),
    )
    keep = torch.tensor([[1.0], [0.0], [1.0], [0.0], [0.0], [1.0]], dtype=F64)
    gx, gw, gb = fast_linear_grads(x, w, b, cot, keep, None, lead=(2, 3))
    kept = keep[:, 0].bool()
    assert_close(gw, cot[kept].t() @ x[kept], **EXACT)
    assert_close(gb, cot[kept].sum(0), **EXACT)
    assert_close(gx, cot @ w, **EXACT)
    # non-tautology: the unmasked gradient differs
    assert not torch.allclose(gw, cot.t() @ x)


def test_routed_linear_partial_requires_grad():
    gen = torch.Generator().manual_seed(0)
    x, w, b, cot = _rand(gen, 5, 4), _rand(gen, 6, 4), _rand(gen, 6), _rand(gen, 5, 6)
    keep = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0]], dtype=F64)
    bs = b.clone().requires_grad_()
    (routed_linear(x, w, bs, keep) * cot).sum().backward()  # only the bias trains
    assert_close(bs.grad, (cot * keep).sum(0), **EXACT)
    ws = w.clone().requires_grad_()
    (routed_linear(x, ws, None, keep) * cot).sum().backward()
    assert_close(ws.grad, (cot * keep).t() @ x, **EXACT)


def test_routed_module_call_rmsnorm_gain_matches_per_row_reference():
    gen = torch.Generator().manual_seed(1)
    n, d = 7, 5
    norm = RMSNorm(d).double()
    with torch.no_grad():
        norm.weight.copy_(_rand(gen, d))
    x, cot = _rand(gen, n, d), _rand(gen, n, d)
    keep = _keep(gen, n, 1)
    keep[0], keep[1] = 1.0, 0.0
    xs = x.clone().requires_grad_()
    y = routed_module_call(norm, xs.view(1, n, d), keep)
    assert_close(y.view(n, d), norm(x), **EXACT)
    (y.view(n, d) * cot).sum().backward()
    ref_w, ref_x = torch.zeros_like(norm.weight), torch.zeros_like(x)
    for i in range(n):
        xi = x[i : i + 1].clone().requires_grad_()
        gx, gw = torch.autograd.grad((norm(xi) * cot[i]).sum(), [xi, norm.weight])
        ref_x[i] = gx[0]
        ref_w += gw * keep[i, 0]
    assert_close(norm.weight.grad, ref_w, **EXACT)
    assert_close(xs.grad, ref_x, **EXACT)
    assert keep.min() == 0 and not torch.allclose(ref_w, torch.zeros_like(ref_w))


def test_mask_cotangent_identity_forward_masked_backward():
    gen = torch.Generator().manual_seed(2)
    x, cot = _rand(gen, 2, 3, 4), _rand(gen, 6, 4)
    keep = torch.tensor([[1.0], [0.0], [0.0], [1.0], [1.0], [0.0]], dtype=F64)
    xs = x.clone().requires_grad_()
    y = mask_cotangent(xs, keep)
    assert torch.equal(y, x)
    (y.reshape(6, 4) * cot).sum().backward()
    assert_close(xs.grad.reshape(6, 4), cot * keep, rtol=0, atol=0)
    assert mask_cotangent(xs, None) is xs


def test_routed_module_call_layernorm_matches_per_row_reference():
    gen = torch.Generator().manual_seed(3)
    n, d = 6, 5
    ln = nn.LayerNorm(d).double()
    with torch.no_grad():
        ln.weight.copy_(1 + _rand(gen, d))
        ln.bias.copy_(_rand(gen, d))
    x, cot = _rand(gen, n, d), _rand(gen, n, d)
    keep = torch.tensor([[0.0], [1.0], [1.0], [0.0], [1.0], [0.0]], dtype=F64)
    xs = x.clone().requires_grad_()
    y = routed_module_call(ln, xs.view(2, 3, d), keep)
    assert_close(y.view(n, d), ln(x), **EXACT)
    (y.view(n, d) * cot).sum().backward()
    ref = {name: torch.zeros_like(p) for name, p in ln.named_parameters()}
    ref_x = torch.zeros_like(x)
    for i in range(n):
        xi = x[i : i + 1].clone().requires_grad_()
        gxi, gw, gb = torch.autograd.grad((ln(xi) * cot[i]).sum(), [xi, ln.weight, ln.bias])
        ref_x[i] = gxi[0]
        ref["weight"] += gw * keep[i, 0]
        ref["bias"] += gb * keep[i, 0]
    assert_close(ln.weight.grad, ref["weight"], **EXACT)
    assert_close(ln.bias.grad, ref["bias"], **EXACT)
    assert_close(xs.grad, ref_x, **EXACT)


def test_all_zero_keep_gives_exact_zero_param_grads():
    gen = torch.Generator().manual_seed(4)
    x, w, b = _rand(gen, 4, 6), _rand(gen, 8, 6).requires_grad_(), _rand(gen, 8).requires_grad_()
    norm = RMSNorm(6).double()
    zero = torch.zeros(4, 1, dtype=F64)
    y = routed_linear(x, w, b, zero).sum() + routed_module_call(norm, x, zero).sum()
    y.backward()
    assert bool((w.grad == 0).all() and (b.grad == 0).all() and (norm.weight.grad == 0).all())


def test_routed_linear_bf16_autocast_cpu():
    gen = torch.Generator().manual_seed(5)
    n, d_in, d_out = 8, 16, 12
    x = torch.randn(n, d_in, generator=gen)
    w = torch.randn(d_out, d_in, generator=gen)
    b = torch.randn(d_out, generator=gen)
    cot = torch.randn(n, d_out, generator=gen)
    keep = torch.tensor([[1.0], [0.0]] * 4)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = routed_linear(xs, ws, bs, keep)
        y_in = routed_linear(xs, ws, bs, None, torch.ones(n, 2))
    assert y.dtype == torch.bfloat16 and y_in.dtype == torch.bfloat16
    (y.float() * cot).sum().backward()
    assert ws.grad.dtype == torch.float32 and bs.grad.dtype == torch.float32
    assert xs.grad.dtype == torch.float32
    kept = keep[:, 0].bool()
    assert_close(y.float(), F.linear(x, w, b), rtol=3e-2, atol=5e-2)
    assert_close(ws.grad, cot[kept].t() @ x[kept], rtol=3e-2, atol=5e-2)
    assert_close(bs.grad, cot[kept].sum(0), rtol=3e-2, atol=5e-2)
    assert_close(xs.grad, cot @ w, rtol=3e-2, atol=5e-2)
    assert not torch.allclose(ws.grad, cot.t() @ x, rtol=3e-2, atol=5e-2)

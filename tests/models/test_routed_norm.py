"""RoutedNorm: a trained norm whose parameter gradients skip forget tokens, by expanded
per-token parameters where that is exact and by the generic rule elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from evil_moe.models.adapters import RoutedNorm, RoutingState
from evil_moe.models.gpt import RMSNorm
from evil_moe.routing.labels import make_plan

F64 = torch.float64
LABELS = torch.tensor([[1, 0, 2, 1], [2, 2, 1, 0]])  # forget, retain, unlabeled


class MeanGain(nn.Module):
    """Per-token, but it reduces its parameter: expanded parameters would mix tokens."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.mean()


def _randomised(module: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def _per_row_reference(module: nn.Module, x: Tensor, cot: Tensor, keep: Tensor):
    """Parameter and input gradients summed token by token, kept tokens only."""
    ref = {n: torch.zeros_like(p) for n, p in module.named_parameters()}
    ref_x = torch.zeros_like(x)
    flat_x, flat_cot = x.reshape(-1, x.shape[-1]), cot.reshape(-1, cot.shape[-1])
    for i in range(flat_x.shape[0]):
        xi = flat_x[i : i + 1].clone().requires_grad_()
        names, params = zip(*module.named_parameters(), strict=True)
        got = torch.autograd.grad((module(xi) * flat_cot[i]).sum(), [xi, *params])
        ref_x.view(-1, x.shape[-1])[i] = got[0][0]
        for n, g in zip(names, got[1:], strict=True):
            ref[n] += g * keep[i, 0]
    return ref, ref_x


@pytest.mark.parametrize(
    ("make", "expandable"),
    [
        (lambda d: RMSNorm(d), True),
        (lambda d: nn.LayerNorm(d), False),  # checks its weight's shape
        (lambda d: MeanGain(d), False),  # expanded parameters would give wrong gradients
    ],
)
def test_routed_norm_matches_the_per_row_reference(make, expandable):
    d = 5
    base = _randomised(make(d).double())
    state = RoutingState("sgtm")
    norm = RoutedNorm(base, state, "norm")
    state.plan = make_plan(LABELS, "sgtm", dtype=F64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, d, generator=gen, dtype=F64)
    cot = torch.randn(2, 4, d, generator=gen, dtype=F64)
    xs = x.clone().requires_grad_()
    assert norm.expandable is expandable  # decided when wrapped, not in a forward pass
    y = norm(xs)
    assert_close(y, base(x), rtol=0, atol=0)
    (y * cot).sum().backward()
    ref, ref_x = _per_row_reference(base, x, cot, state.plan.shared_grad)
    for n, p in base.named_parameters():
        assert_close(p.grad, ref[n], rtol=1e-12, atol=1e-12, msg=n)
    assert_close(xs.grad, ref_x, rtol=1e-12, atol=1e-12)
    forget = LABELS.reshape(-1) == 1
    assert forget.any() and not torch.allclose(ref["weight"] * 0, ref["weight"])


def test_routed_norm_without_labels_or_gradients_is_the_plain_module():
    base = _randomised(RMSNorm(3))
    state = RoutingState("sgtm")
    norm = RoutedNorm(base, state, "norm")
    x = torch.randn(2, 4, 3)
    assert torch.equal(norm(x), base(x))  # no plan
    state.plan = make_plan(LABELS, "sgtm")
    with torch.no_grad():
        assert torch.equal(norm(x), base(x))

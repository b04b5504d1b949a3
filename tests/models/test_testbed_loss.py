"""``lm_loss``: next-token cross-entropy with the three reductions."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from evil_moe.models import testbed as tb


def _manual(logits, targets):
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def test_reductions_float32():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen)
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    per_token = _manual(logits, targets)
    none = tb.lm_loss(logits, targets, reduction="none")
    assert none.shape == (3, 5)
    assert_close(none, per_token)
    assert_close(tb.lm_loss(logits, targets, reduction="sum"), per_token.sum())
    assert_close(tb.lm_loss(logits, targets), per_token.mean())


def test_bf16_logits_are_upcast():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=gen).bfloat16()
    targets = torch.randint(0, 7, (2, 4), generator=gen)
    loss = tb.lm_loss(logits, targets, reduction="sum")
    assert loss.dtype == torch.float32
    assert_close(loss, _manual(logits.float(), targets).sum())


def test_float64_logits_keep_float64_precision():
    """Gradient-exactness tests run the model in float64; the loss must not round it to
    float32 (``logits.float()`` downcasts float64)."""
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 4, 7, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, 7, (2, 4), generator=gen)
    loss = tb.lm_loss(logits, targets, reduction="sum")
    (grad,) = torch.autograd.grad(loss, logits)
    ref = _manual(logits, targets).sum()
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert loss.dtype == torch.float64
    assert_close(loss, ref, rtol=1e-13, atol=1e-13)
    assert_close(grad, ref_grad, rtol=1e-13, atol=1e-13)

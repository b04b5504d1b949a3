"""DEMix (hard forward dispatch, the negative control): forget tokens run the quarantine
instead of the shared MLP path; every other token runs without the quarantine."""

from __future__ import annotations

import pytest
import torch
from testbed_reference import (
    FORGET,
    RETAIN,
    UNLABELED,
    make_model,
    quarantine_names,
    sequence_route,
    tiny_config,
    token_loss_sum,
)

LABELS = [FORGET, RETAIN, UNLABELED, FORGET, UNLABELED]


def _setup(n_layer):
    cfg = tiny_config(n_layer=n_layer, n_experts=2, n_quarantine_heads=1, shared_expert_width=8)
    model = make_model(cfg, seed=50 + n_layer)
    route = sequence_route(LABELS, cfg.seq_len)
    tokens = torch.randint(
        0, cfg.vocab_size, route.shape, generator=torch.Generator().manual_seed(9)
    )
    return model, route, tokens


def _perturbed_logits(model, route, tokens, select):
    with torch.no_grad():
        before = model(tokens, route, semantics="demix")
        saved = {n: p.clone() for n, p in model.named_parameters() if select(n)}
        assert saved
        for n, p in model.named_parameters():
            if n in saved:
                p.add_(torch.randn_like(p))
        after = model(tokens, route, semantics="demix")
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
    return before, after


@pytest.mark.parametrize("n_layer", [1, 2])
def test_forget_output_ignores_shared_mlp(n_layer):
    model, route, tokens = _setup(n_layer)
    before, after = _perturbed_logits(
        model, route, tokens, lambda n: ".mlp.base_layer." in n or ".mlp.shared." in n
    )
    forget = route == FORGET
    assert torch.equal(before[forget], after[forget])
    assert (before[~forget] - after[~forget]).abs().max() > 1e-3


@pytest.mark.parametrize("n_layer", [1, 2])
def test_other_outputs_ignore_quarantine(n_layer):
    model, route, tokens = _setup(n_layer)
    q = quarantine_names(model)
    before, after = _perturbed_logits(model, route, tokens, lambda n: n in q)
    forget = route == FORGET
    assert torch.equal(before[~forget], after[~forget])
    assert (before[forget] - after[forget]).abs().max() > 1e-3


def test_demix_gradients_follow_dispatch():
    model, _, _ = _setup(1)
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    q = quarantine_names(model)

    def shared_mlp(n):
        return ".mlp.base_layer." in n or ".mlp.shared." in n

    assert any(shared_mlp(n) for n, _ in model.named_parameters())

    for label, silent, active in (
        (FORGET, shared_mlp, q.__contains__),
        (RETAIN, q.__contains__, shared_mlp),
    ):
        route = torch.full_like(tokens, label)
        model.zero_grad(set_to_none=True)
        token_loss_sum(model(tokens, route, semantics="demix"), tokens).backward()
        for n, p in model.named_parameters():
            if silent(n):
                assert p.grad is None or bool((p.grad == 0).all()), n
            if active(n):
                assert p.grad is not None and p.grad.abs().sum() > 0, n
        # attention is shared and not dispatched: it trains on every label
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_demix_masked_is_demix_forward_with_every_shared_gradient_masked():
    """``demix_masked`` differs from ``sgtm`` in the dispatch alone: forget tokens write
    nothing into any shared parameter (attention, embeddings, norms included)."""
    model, route, tokens = _setup(2)
    q = quarantine_names(model)
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens, route, semantics="demix_masked"),
            model(tokens, route, semantics="demix"),
            rtol=0,
            atol=1e-12,
        )
    forget_only = torch.full_like(tokens, FORGET)
    model.zero_grad(set_to_none=True)
    token_loss_sum(model(tokens, forget_only, semantics="demix_masked"), tokens).backward()
    for n, p in model.named_parameters():
        if n in q:
            continue
        assert p.grad is None or bool((p.grad == 0).all()), n
    assert any(model.get_parameter(n).grad.abs().sum() > 0 for n in q)
    # plain demix lets forget tokens train shared attention: the confound removed here
    model.zero_grad(set_to_none=True)
    token_loss_sum(model(tokens, forget_only, semantics="demix"), tokens).backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0

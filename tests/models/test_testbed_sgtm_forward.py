"""SGTM forward invariance: routing changes gradients, never the forget/unlabeled forward.

Forget and unlabeled positions must see exactly the unrouted model; retain positions must
see the model with its quarantine removed (``ablated(model)``).
"""

from __future__ import annotations

import pytest
import torch
from testbed_reference import FORGET, RETAIN, UNLABELED, make_model, sequence_route, tiny_config
from torch.testing import assert_close

from evil_moe.modules.ablation import ablated

CONFIGS = [
    dict(),
    dict(n_experts=1, n_quarantine_heads=2),
    dict(n_experts=4, n_quarantine_heads=2, shared_expert_width=8),
    dict(n_quarantine_heads=0, route_embeddings=False, route_norms=False),
    dict(n_layer=1, activation="silu"),
]
TIGHT = dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("overrides", CONFIGS)
def test_sgtm_forward_matches_none_and_ablated(overrides):
    cfg = tiny_config(**overrides)
    model = make_model(cfg, seed=3)
    labels = [RETAIN, FORGET, UNLABELED, RETAIN, UNLABELED, FORGET]
    route = sequence_route(labels, cfg.seq_len)
    tokens = torch.randint(
        0, cfg.vocab_size, route.shape, generator=torch.Generator().manual_seed(1)
    )

    with torch.no_grad():
        routed = model(tokens, route, semantics="sgtm")
        plain = model(tokens, semantics="none")
        plain_via_route = model(tokens, route, semantics="none")
        with ablated(model):
            deployed = model(tokens, semantics="none")

    retain = route == RETAIN
    assert_close(routed[~retain], plain[~retain], **TIGHT)
    assert_close(routed[retain], deployed[retain], **TIGHT)
    assert_close(plain_via_route, plain, rtol=0, atol=0)
    # Non-tautology: the quarantine really matters at retain positions (and only there).
    assert (plain[retain] - deployed[retain]).abs().max() > 1e-3


def test_route_none_is_unrouted():
    cfg = tiny_config()
    model = make_model(cfg, seed=5)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    with torch.no_grad():
        assert torch.equal(model(tokens, None, semantics="sgtm"), model(tokens, semantics="none"))


def test_all_retain_equals_ablated_everywhere():
    cfg = tiny_config(n_experts=4, n_quarantine_heads=2, shared_expert_width=8)
    model = make_model(cfg, seed=7)
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len))
    route = torch.full_like(tokens, RETAIN)
    with torch.no_grad():
        routed = model(tokens, route, semantics="sgtm")
        with ablated(model):
            deployed = model(tokens)
    assert_close(routed, deployed, **TIGHT)


def test_forward_rejects_bad_inputs():
    cfg = tiny_config()
    model = make_model(cfg)
    tokens = torch.zeros(2, cfg.seq_len, dtype=torch.long)
    with pytest.raises(ValueError):
        model(tokens, torch.zeros(2, cfg.seq_len - 1, dtype=torch.long))
    with pytest.raises(ValueError):
        model(tokens, torch.full_like(tokens, 3))
    with pytest.raises(ValueError):
        model(tokens, torch.zeros_like(tokens), semantics="bogus")
    with pytest.raises(ValueError):
        model(torch.zeros(1, cfg.seq_len + 1, dtype=torch.long))

"""The shared always-on expert, masked (like the core) or open to every token."""

from __future__ import annotations

import pytest
import torch
from testbed_reference import FORGET, make_model, sequence_route, tiny_config, token_loss_sum


def _grads(model, tokens, route):
    model.zero_grad(set_to_none=True)
    token_loss_sum(model(tokens, route), tokens).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("open_expert", [False, True])
def test_forget_tokens_train_the_shared_expert_only_when_it_is_open(open_expert):
    cfg = tiny_config(shared_expert_width=8, shared_expert_open=open_expert)
    model = make_model(cfg, seed=4)
    route = sequence_route([FORGET, FORGET], cfg.seq_len)
    tokens = torch.randint(
        0, cfg.vocab_size, route.shape, generator=torch.Generator().manual_seed(1)
    )
    grads = _grads(model, tokens, route)
    assert any(".mlp.shared." in n for n in grads) and any(".mlp.base_layer." in n for n in grads)
    for name, g in grads.items():
        if ".mlp.shared." in name:
            trained = g is not None and bool(g.abs().sum() > 0)
            assert trained == open_expert, name
        if ".mlp.base_layer." in name:
            assert g is None or bool((g == 0).all()), name
    groups = model.parameter_groups()
    shared_expert = {id(p) for n, p in model.named_parameters() if ".mlp.shared." in n}
    opened = {id(p) for p in groups.open_shared} & shared_expert
    assert opened == (shared_expert if open_expert else set())


def test_open_and_masked_shared_experts_compute_the_same_forward():
    masked = make_model(tiny_config(shared_expert_width=8), seed=2)
    opened = make_model(tiny_config(shared_expert_width=8, shared_expert_open=True), seed=2)
    opened.load_state_dict(masked.state_dict())
    route = sequence_route([FORGET, 0, 2], 8)
    tokens = torch.randint(0, 64, route.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(masked(tokens, route), opened(tokens, route), rtol=0, atol=1e-12)

"""Same seed, same model and same gradients; a different seed gives a different model."""

from __future__ import annotations

import torch
from testbed_reference import FORGET, RETAIN, UNLABELED, sequence_route, tiny_config

from evil_moe.models import testbed as tb


def _build(seed, cfg):
    torch.manual_seed(seed)
    return tb.Testbed(cfg)


def _grads(model, tokens, route):
    model.zero_grad(set_to_none=True)
    tb.lm_loss(model(tokens, route), tokens, reduction="sum").backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_same_seed_same_init_and_grads():
    cfg = tiny_config(n_experts=4, n_quarantine_heads=2, shared_expert_width=8)
    a, b, c = _build(0, cfg), _build(0, cfg), _build(1, cfg)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)

    tokens = torch.randint(
        0, cfg.vocab_size, (3, cfg.seq_len), generator=torch.Generator().manual_seed(0)
    )
    route = sequence_route([RETAIN, FORGET, UNLABELED], cfg.seq_len)
    ga, gb, gc = _grads(a, tokens, route), _grads(b, tokens, route), _grads(c, tokens, route)
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k
    assert any(not torch.equal(ga[k], gc[k]) for k in ga)

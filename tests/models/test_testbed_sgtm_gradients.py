"""SGTM gradient exactness: one mixed-batch backward equals the paper's per-group algorithm.

Fast path: ONE forward + backward of the whole mixed batch with ``semantics="sgtm"``.
Slow reference (SGTM paper, one group of sequences at a time, gradients summed):

* unlabeled sequences: ordinary forward/backward (``semantics="none"``);
* forget sequences: ordinary forward/backward, then the gradients of every routed shared
  parameter are zeroed;
* retain sequences: forward/backward of the deployed model (``ablated(model)``), so the
  quarantine receives nothing.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testbed_reference import (
    FORGET,
    RETAIN,
    UNLABELED,
    grads_of,
    make_model,
    quarantine_names,
    routed_shared_names,
    sequence_route,
    tiny_config,
)
from torch.testing import assert_close

from evil_moe.models.testbed import lm_loss
from evil_moe.modules.ablation import ablated


def fast_grads(model, tokens, targets, route):
    logits = model(tokens, route, semantics="sgtm")
    return grads_of(model, lm_loss(logits, targets, reduction="sum"))


def slow_grads(model, tokens, targets, labels):
    labels_t = torch.tensor(labels)
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    routed = routed_shared_names(model)
    for label in (RETAIN, FORGET, UNLABELED):
        idx = (labels_t == label).nonzero().flatten()
        if idx.numel() == 0:
            continue
        tok, tgt = tokens[idx], targets[idx]
        if label == RETAIN:
            with ablated(model):  # quarantine zeroed and frozen: it gets no gradient
                g = grads_of(model, lm_loss(model(tok, semantics="none"), tgt, reduction="sum"))
        else:
            g = grads_of(model, lm_loss(model(tok, semantics="none"), tgt, reduction="sum"))
            if label == FORGET:
                g = {n: torch.zeros_like(v) if n in routed else v for n, v in g.items()}
        for n in total:
            total[n] += g[n]
    return total


def batch(cfg, labels, seed, length=None):
    gen = torch.Generator().manual_seed(seed)
    T = length or cfg.seq_len
    tokens = torch.randint(0, cfg.vocab_size, (len(labels), T), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (len(labels), T), generator=gen)
    return tokens, targets, sequence_route(labels, T)


configs = st.fixed_dictionaries(
    dict(
        n_experts=st.sampled_from([1, 2, 4]),
        n_quarantine_heads=st.sampled_from([0, 1, 2]),
        shared_expert_width=st.sampled_from([0, 8]),
        route_embeddings=st.booleans(),
        route_norms=st.booleans(),
        n_layer=st.sampled_from([1, 2]),
        activation=st.sampled_from(["gelu", "silu", "relu"]),
    )
)


@settings(max_examples=30, deadline=None)
@given(
    overrides=configs,
    labels=st.lists(st.sampled_from([RETAIN, FORGET, UNLABELED]), min_size=1, max_size=6),
    length=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_mixed_batch_equals_per_group_reference(overrides, labels, length, seed):
    cfg = tiny_config(**overrides)
    model = make_model(cfg, seed=seed)
    tokens, targets, route = batch(cfg, labels, seed + 1, length)
    fast = fast_grads(model, tokens, targets, route)
    slow = slow_grads(model, tokens, targets, labels)
    assert fast.keys() == slow.keys()
    for name in fast:
        assert_close(fast[name], slow[name], rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


def test_reference_detects_unrouted_training():
    """The comparison can fail: standard training of a mixed batch is not SGTM."""
    cfg = tiny_config(n_experts=2, shared_expert_width=8)
    model = make_model(cfg, seed=11)
    labels = [FORGET, RETAIN, UNLABELED, FORGET]
    tokens, targets, route = batch(cfg, labels, 12)
    unrouted = grads_of(model, lm_loss(model(tokens, route, semantics="none"), targets, "sum"))
    slow = slow_grads(model, tokens, targets, labels)
    differs = [n for n in slow if not torch.allclose(unrouted[n], slow[n], rtol=1e-6, atol=1e-9)]
    assert set(differs) >= routed_shared_names(model) | quarantine_names(model)


CONFIG_GRID = [
    dict(),
    dict(n_experts=4, n_quarantine_heads=2, shared_expert_width=8),
    dict(n_experts=1, route_embeddings=False, route_norms=False),
]


def _all_grads(model, route, tokens, targets, semantics="sgtm"):
    for p in model.parameters():
        p.grad = None
    lm_loss(model(tokens, route, semantics=semantics), targets, reduction="sum").backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_forget_only_batch_exactly_zero_on_routed_shared():
    for overrides in CONFIG_GRID:
        cfg = tiny_config(**overrides)
        model = make_model(cfg, seed=21)
        tokens, targets, route = batch(cfg, [FORGET] * 3, 22)
        grads = _all_grads(model, route, tokens, targets)
        routed = routed_shared_names(model)
        for name in routed:
            g = grads[name]
            assert g is None or bool((g == 0).all()), f"{name} got forget gradient"
        for name in quarantine_names(model):
            assert grads[name] is not None and grads[name].abs().sum() > 0, name
        for name in set(grads) - routed - quarantine_names(model):  # open shared params
            assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_retain_only_batch_exactly_zero_on_quarantine():
    for overrides in CONFIG_GRID:
        cfg = tiny_config(**overrides)
        model = make_model(cfg, seed=31)
        tokens, targets, route = batch(cfg, [RETAIN] * 3, 32)
        grads = _all_grads(model, route, tokens, targets)
        for name in quarantine_names(model):
            g = grads[name]
            assert g is None or bool((g == 0).all()), f"{name} got retain gradient"
        for name in routed_shared_names(model):
            assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_forget_rows_do_not_change_shared_grads_of_other_rows():
    """Adding forget sequences to a batch leaves every routed shared gradient bit-for-bit
    unchanged up to float reassociation, while the quarantine gradient changes."""
    cfg = tiny_config(n_experts=2, n_quarantine_heads=2, shared_expert_width=8)
    model = make_model(cfg, seed=41)
    tokens, targets, route = batch(cfg, [UNLABELED, RETAIN, FORGET, FORGET], 42)
    base = _all_grads(model, route[:2], tokens[:2], targets[:2])
    base = {n: g.clone() for n, g in base.items()}
    mixed = _all_grads(model, route, tokens, targets)
    for name in routed_shared_names(model):
        assert_close(mixed[name], base[name], rtol=1e-12, atol=1e-12, msg=name)
    for name in quarantine_names(model):
        assert not torch.allclose(mixed[name], base[name])

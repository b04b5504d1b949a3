"""The testbed against an independent slow reference, with per-TOKEN route labels.

``testbed_reference.reference_forward`` re-implements the model with plain torch ops and
expresses routing with ``torch.where`` + ``.detach()``:

* SGTM, per position: routed shared parameters are used detached at forget positions
  (their gradient only sums non-forget rows; activation cotangents flow unchanged), and the
  quarantine outputs are removed at retain positions.
* Gradient routing (Cloud et al.): the shared block outputs (core attention after its
  output projection; core MLP + shared expert) are ``.detach()``-ed at forget positions;
  the quarantine outputs are removed at retain positions.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testbed_reference import (
    EMBEDDING_NAMES,
    FORGET,
    RETAIN,
    UNLABELED,
    block_shared_names,
    grads_of,
    make_model,
    quarantine_names,
    reference_forward,
    sequence_route,
    tiny_config,
    token_loss_sum,
)
from torch.testing import assert_close

configs = st.fixed_dictionaries(
    dict(
        n_experts=st.sampled_from([1, 2, 4]),
        n_quarantine_heads=st.sampled_from([0, 1, 2]),
        shared_expert_width=st.sampled_from([0, 8]),
        route_embeddings=st.booleans(),
        route_norms=st.booleans(),
        n_layer=st.sampled_from([1, 2]),
        activation=st.sampled_from(["gelu", "silu"]),
    )
)


@st.composite
def routes(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 8))
    labels = st.sampled_from([RETAIN, FORGET, UNLABELED])
    if draw(st.booleans()):
        flat = draw(st.lists(labels, min_size=B * T, max_size=B * T))
        return torch.tensor(flat).view(B, T)
    return sequence_route(draw(st.lists(labels, min_size=B, max_size=B)), T)


def _inputs(cfg, route, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, route.shape, generator=gen)
    targets = torch.randint(0, cfg.vocab_size, route.shape, generator=gen)
    return tokens, targets


def _compare(model, tokens, targets, route, semantics, ref_kwargs):
    fast_logits = model(tokens, route, semantics=semantics)
    ref_logits = reference_forward(model, tokens, **ref_kwargs)
    assert_close(fast_logits, ref_logits, rtol=1e-10, atol=1e-10)
    fast = grads_of(model, token_loss_sum(fast_logits, targets))
    ref = grads_of(model, token_loss_sum(ref_logits, targets))
    for name in fast:
        assert_close(fast[name], ref[name], rtol=1e-9, atol=1e-11, msg=f"grad of {name}")


@settings(max_examples=25, deadline=None)
@given(overrides=configs, route=routes(), seed=st.integers(0, 2**16))
def test_sgtm_per_token_matches_reference(overrides, route, seed):
    cfg = tiny_config(**overrides)
    model = make_model(cfg, seed=seed)
    tokens, targets = _inputs(cfg, route, seed + 1)
    ref = dict(shared_keep=route != FORGET, q_on=route != RETAIN)
    _compare(model, tokens, targets, route, "sgtm", ref)


@settings(max_examples=25, deadline=None)
@given(overrides=configs, route=routes(), seed=st.integers(0, 2**16))
def test_gradient_routing_matches_detach_reference(overrides, route, seed):
    cfg = tiny_config(**overrides)
    model = make_model(cfg, seed=seed)
    tokens, targets = _inputs(cfg, route, seed + 1)
    ref = dict(detach_out=route == FORGET, q_on=route != RETAIN)
    _compare(model, tokens, targets, route, "gradient_routing", ref)


def test_reference_is_sensitive_to_the_routing():
    """Non-tautology: the unrouted model's gradients differ from both references."""
    cfg = tiny_config(n_quarantine_heads=2, shared_expert_width=8)
    model = make_model(cfg, seed=1)
    route = torch.tensor([[FORGET, UNLABELED, FORGET, RETAIN, UNLABELED, FORGET, RETAIN, FORGET]])
    tokens, targets = _inputs(cfg, route, 2)
    plain = grads_of(model, token_loss_sum(model(tokens, semantics="none"), targets))
    for kwargs in (
        dict(shared_keep=route != FORGET, q_on=route != RETAIN),
        dict(detach_out=route == FORGET, q_on=route != RETAIN),
    ):
        ref = grads_of(model, token_loss_sum(reference_forward(model, tokens, **kwargs), targets))
        assert not torch.allclose(
            plain["blocks.0.attn.base_layer.qkv.base_layer.weight"],
            ref["blocks.0.attn.base_layer.qkv.base_layer.weight"],
        )
        for name in quarantine_names(model):
            assert not torch.allclose(plain[name], ref[name]), name


def test_reference_forward_equals_model_unrouted():
    cfg = tiny_config(n_experts=4, n_quarantine_heads=2, shared_expert_width=8)
    model = make_model(cfg, seed=4)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    with torch.no_grad():
        assert_close(
            model(tokens, semantics="none"),
            reference_forward(model, tokens),
            rtol=1e-12,
            atol=1e-12,
        )


# -- gradient routing: explicit properties --------------------------------------------------
def test_gradient_routing_forward_without_retain_equals_none():
    cfg = tiny_config(n_experts=2, n_quarantine_heads=1, shared_expert_width=8)
    model = make_model(cfg, seed=5)
    route = torch.tensor([[FORGET] * 8, [UNLABELED] * 8, [FORGET, UNLABELED] * 4])
    tokens = torch.randint(0, cfg.vocab_size, route.shape)
    with torch.no_grad():
        assert_close(
            model(tokens, route, semantics="gradient_routing"),
            model(tokens, semantics="none"),
            rtol=0,
            atol=0,
        )


def test_gradient_routing_forget_only_batch():
    """Forget-only: block-internal shared weights get exactly zero gradient; embeddings
    still learn through the residual stream; quarantine parameters learn."""
    cfg = tiny_config(n_experts=2, n_quarantine_heads=1, shared_expert_width=8)
    model = make_model(cfg, seed=6)
    route = sequence_route([FORGET] * 3, cfg.seq_len)
    tokens, targets = _inputs(cfg, route, 7)
    token_loss_sum(model(tokens, route, semantics="gradient_routing"), targets).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    inside = block_shared_names(model)
    assert any(".mlp.shared." in n for n in inside)
    for name in inside:
        assert grads[name] is None or bool((grads[name] == 0).all()), name
    for name in (
        EMBEDDING_NAMES | quarantine_names(model) | {n for n in grads if n.startswith("norm_f.")}
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name

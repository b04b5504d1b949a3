"""Ablation: removing quarantine experts (all, or a subset) from the forward pass."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from evil_moe.models import testbed as tb
from evil_moe.modules.ablation import ablate, ablated, quarantine_parameters
from tiny import tiny_config

RETAIN = 0


def _model(seed=0, **overrides):
    cfg = tiny_config(
        **{"n_experts": 4, "n_quarantine_heads": 4, "shared_expert_width": 8} | overrides
    )
    torch.manual_seed(seed)
    model = tb.Testbed(cfg).double()
    with torch.no_grad():  # generic values everywhere (biases are zero at init)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _heads(attn, h):
    """The parameter slices of quarantine attention head ``h``: (q|k|v rows, bias, out cols)."""
    hd, nq = attn.head_dim, attn.n_qhead
    return (
        attn.q_qkv.view(3, nq, hd, -1)[:, h],
        attn.q_qkv_bias.view(3, nq, hd)[:, h],
        attn.q_out[:, h * hd : (h + 1) * hd],
    )


def _expert_parts(experts, k):
    s = experts.expert_slice(k)
    return (experts.up[s], experts.up_bias[s], experts.down[:, s])


def test_quarantine_parameter_names():
    model = _model(n_layer=1)
    names = set(quarantine_parameters(model))
    ex = model.blocks[0].mlp.experts
    expected_ids = {id(p) for p in (ex.up, ex.up_bias, ex.down)}
    attn = model.blocks[0].attn
    expected_ids |= {id(attn.q_qkv), id(attn.q_qkv_bias), id(attn.q_out)}
    assert {id(p) for p in quarantine_parameters(model).values()} == expected_ids
    assert not any(".core." in n or "shared_expert" in n or "wte" in n for n in names)
    no_heads = _model(n_layer=1, n_quarantine_heads=0)
    assert all(".attn." not in n for n in quarantine_parameters(no_heads))


@pytest.mark.parametrize("mode", ["zero", "reinit"])
def test_ablated_round_trip_restores_bitwise(mode):
    model = _model()
    model.blocks[0].attn.q_out.requires_grad_(False)
    model.blocks[1].mlp.experts.up_bias.requires_grad_(False)
    values, flags = _values(model), _flags(model)
    qnames = set(quarantine_parameters(model))
    with ablated(model, mode=mode) as inside:
        assert inside is model
        now = _values(model)
        for n in qnames:
            assert not model.get_parameter(n).requires_grad
            assert not torch.equal(now[n], values[n]) or bool((values[n] == 0).all()), n
            if mode == "zero":
                assert bool((now[n] == 0).all()), n
        for n in set(values) - qnames:
            assert torch.equal(now[n], values[n]), n
    after = _values(model)
    for n in values:
        assert torch.equal(after[n], values[n]), n
    assert _flags(model) == flags


def test_ablated_restores_when_body_raises():
    model = _model()
    model.blocks[1].attn.q_qkv.requires_grad_(False)
    values, flags = _values(model), _flags(model)
    with pytest.raises(RuntimeError, match="boom"), ablated(model, experts=[1, 2]):
        raise RuntimeError("boom")
    for n, v in _values(model).items():
        assert torch.equal(v, values[n]), n
    assert _flags(model) == flags


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_ablate_one_expert_zeroes_only_its_slice_and_heads(k):
    model = _model()  # K=4 experts, 4 quarantine heads: head h belongs to expert h
    before = copy.deepcopy(model)
    ablate(model, experts=[k])
    for blk, old in zip(model.blocks, before.blocks, strict=True):
        for j in range(4):
            new_parts = _expert_parts(blk.mlp.experts, j) + _heads(blk.attn, j)
            old_parts = _expert_parts(old.mlp.experts, j) + _heads(old.attn, j)
            for new, prev in zip(new_parts, old_parts, strict=True):
                if j == k:
                    assert bool((new == 0).all())
                else:
                    assert torch.equal(new, prev)
                    assert bool((prev != 0).any())
    qnames = set(quarantine_parameters(model))
    prev = _values(before)
    for n, v in _values(model).items():
        if n not in qnames:
            assert torch.equal(v, prev[n]), n
    assert all(p.requires_grad for p in model.parameters())  # subsets are not frozen


@pytest.mark.parametrize(
    ("n_experts", "n_heads", "ablate_experts", "expected_heads"),
    [
        (4, 2, [1], []),  # heads not split among experts: common to the whole quarantine
        (4, 2, [0, 1, 2, 3], [0, 1]),
        (2, 4, [1], [2, 3]),  # two heads per expert
        (1, 2, [0], [0, 1]),
    ],
)
def test_head_ownership(n_experts, n_heads, ablate_experts, expected_heads):
    model = _model(n_experts=n_experts, n_quarantine_heads=n_heads, n_layer=1)
    before = copy.deepcopy(model)
    ablate(model, experts=ablate_experts)
    for h in range(n_heads):
        for new, old in zip(
            _heads(model.blocks[0].attn, h), _heads(before.blocks[0].attn, h), strict=True
        ):
            if h in expected_heads:
                assert bool((new == 0).all())
            else:
                assert torch.equal(new, old)


def test_ablate_all_freezes():
    model = _model()
    ablate(model)
    for p in quarantine_parameters(model).values():
        assert not p.requires_grad and bool((p == 0).all())
    unfrozen = _model()
    ablate(unfrozen, freeze=False)
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_reinit_keeps_std_and_changes_values():
    model = _model(d_model=32, n_head=2, quarantine_width=64, n_experts=2, n_quarantine_heads=2)
    before = copy.deepcopy(model)
    ablate(model, experts=[1], mode="reinit", seed=3)
    for blk, old in zip(model.blocks, before.blocks, strict=True):
        for new, prev in zip(
            _expert_parts(blk.mlp.experts, 1) + _heads(blk.attn, 1),
            _expert_parts(old.mlp.experts, 1) + _heads(old.attn, 1),
            strict=True,
        ):
            assert not torch.allclose(new, prev)
            if new.numel() >= 256:  # enough samples for a 20% std check
                ratio = float(new.detach().std()) / float(prev.detach().std())
                assert 0.8 < ratio < 1.2, ratio
        for new, prev in zip(
            _expert_parts(blk.mlp.experts, 0) + _heads(blk.attn, 0),
            _expert_parts(old.mlp.experts, 0) + _heads(old.attn, 0),
            strict=True,
        ):
            assert torch.equal(new, prev)
    same, other = copy.deepcopy(before), copy.deepcopy(before)
    ablate(same, experts=[1], mode="reinit", seed=3)
    ablate(other, experts=[1], mode="reinit", seed=4)
    up = lambda m: m.blocks[0].mlp.experts.up  # noqa: E731
    assert torch.equal(up(same), up(model))
    assert not torch.equal(up(other), up(model))


def test_zero_ablation_equals_sgtm_all_retain():
    model = _model()
    tokens = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        routed = model(tokens, torch.full_like(tokens, RETAIN), semantics="sgtm")
        full = model(tokens, semantics="none")
        ablate(model)
        deployed = model(tokens, semantics="none")
    assert_close(deployed, routed, rtol=1e-12, atol=1e-12)
    assert (full - deployed).abs().max() > 1e-4


def test_invalid_arguments():
    model = _model()
    with pytest.raises(ValueError):
        ablate(model, mode="bogus")
    for bad in ([4], [-1], [0, 7]):
        with pytest.raises(ValueError):
            ablate(model, experts=bad)
    with pytest.raises(ValueError), ablated(model, mode="prune"):
        pass
    with pytest.raises(ValueError):
        ablate(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError):
        tb.TestbedConfig(n_experts=3, quarantine_width=8)

"""Expert-level measurements: per-expert outputs, cancellation, mean ablation, NMI null."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from evil_moe.eval.expert_ablation import (
    cancellation_ratio,
    distinctive_tokens,
    mean_ablation_matrix,
    per_expert_outputs,
    permutation_nmi,
)
from evil_moe.models import testbed as tb
from evil_moe.modules.experts import FusedExperts
from evil_moe.routing.labels import make_plan
from evil_moe.routing.routers import RouterConfig


def _model(n_layer: int = 2, seed: int = 0) -> tb.Testbed:
    cfg = tb.TestbedConfig(
        vocab_size=16,
        seq_len=6,
        d_model=8,
        n_layer=n_layer,
        n_head=2,
        mlp_width=16,
        quarantine_width=4,
        n_experts=2,
        n_quarantine_heads=0,
        router=RouterConfig(policy="topk"),
    )
    torch.manual_seed(seed)
    model = tb.Testbed(cfg).double()
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.experts.up.normal_(0, 1.0)
            block.mlp.experts.down.normal_(0, 1.0)
    return model


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 16, (n, 7), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _seq_losses(model, tokens):
    return tb.lm_loss(model(tokens[:, :-1]), tokens[:, 1:], reduction="none").mean(dim=1)


def test_per_expert_outputs_sum_to_the_bank_output():
    bank = FusedExperts(5, 3, width=6, n_experts=3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    parts = per_expert_outputs(bank, x)
    assert parts.shape == (4, 3, 3)
    whole = bank(x, make_plan(None))
    torch.testing.assert_close(parts.sum(dim=1), whole, rtol=0, atol=1e-12)
    gate = torch.rand(4, 3, dtype=torch.float64)
    gated = per_expert_outputs(bank, x, gate)
    torch.testing.assert_close(gated, parts * gate[:, :, None], rtol=0, atol=1e-12)


def test_cancellation_ratio_is_one_for_aligned_experts_and_large_for_opposed_ones():
    model = _model(n_layer=1)
    tokens = _tokens(4, 1)
    experts = model.blocks[0].mlp.experts
    with torch.no_grad():  # expert 1 = copy of expert 0: outputs add up exactly
        experts.up[experts.expert_slice(1)] = experts.up[experts.expert_slice(0)]
        experts.up_bias[experts.expert_slice(1)] = experts.up_bias[experts.expert_slice(0)]
        experts.down[:, experts.expert_slice(1)] = experts.down[:, experts.expert_slice(0)]
    assert cancellation_ratio(model, tokens)["mean"] == pytest.approx(1.0, abs=1e-9)
    with torch.no_grad():  # expert 1 = -1.01 x expert 0: they almost cancel
        experts.down[:, experts.expert_slice(1)] *= -1.01
    ratio = cancellation_ratio(model, tokens)["mean"]
    assert ratio == pytest.approx(2.01 / 0.01, rel=1e-6)


def test_mean_ablation_equals_a_constant_output_in_place_of_the_expert():
    model = _model()
    rows = {"retain": _tokens(3, 1), "a": _tokens(3, 2), "b": _tokens(3, 3)}
    before = {n: p.clone() for n, p in model.named_parameters()}
    result = mean_ablation_matrix(model, rows, batch_size=2, permutations=20)
    assert result["units"] == [f"blocks.{i}.mlp.experts.q{k}" for i in (0, 1) for k in (0, 1)]
    everything = torch.cat(list(rows.values()))
    for u, (layer, k) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        # reference: capture the expert's mean output, then zero the expert and add the
        # mean to the core MLP's output bias (the same bank, so the same place)
        outputs = []
        bank = model.blocks[layer].mlp.experts
        hook = bank.register_forward_hook(
            lambda _m, args, _o, bank=bank, k=k, outputs=outputs: outputs.append(
                per_expert_outputs(bank, args[0])[:, k]
            )
        )
        with torch.no_grad():
            model(everything[:, :-1])
        hook.remove()
        mean = torch.cat(outputs).mean(dim=0)
        ref = copy.deepcopy(model)
        with torch.no_grad():
            rb = ref.blocks[layer].mlp
            rb.experts.up[rb.experts.expert_slice(k)] = 0
            rb.experts.up_bias[rb.experts.expert_slice(k)] = 0
            rb.experts.down[:, rb.experts.expert_slice(k)] = 0
            rb.base_layer.down.base_layer.bias.add_(mean)
        for name, tokens in rows.items():
            expected = float((_seq_losses(ref, tokens) - _seq_losses(model, tokens)).mean())
            assert result["increase"][name][u] == pytest.approx(expected, abs=1e-9), (name, u)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # hooks removed, nothing changed
    assert 0 <= result["nmi_mode_expert"] <= 1
    assert 0 < result["nmi_p_value"] <= 1


def test_permutation_null_separates_planted_specialisation_from_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2, 3], 30)  # row 0 is retain, rows 1-3 forget modes
    planted = rng.normal(0, 0.05, (120, 3))
    for mode in (1, 2, 3):
        planted[labels == mode, mode - 1] += 1.0  # unit m-1 hurts mode m only
    nmi, null_mean, p = permutation_nmi(planted, labels, [1, 2, 3], permutations=200)
    assert nmi > 0.5 and null_mean < 0.2 and p < 0.01
    noise = np.abs(rng.normal(0, 1.0, (120, 3)))
    nmi, null_mean, p = permutation_nmi(noise, labels, [1, 2, 3], permutations=200)
    assert p > 0.05 and nmi < 0.1


def test_distinctive_tokens_are_the_mode_specific_ones():
    retain = torch.tensor([[0, 1, 2, 3, 1, 2, 3, 1]] * 4)
    mode = torch.tensor([[0, 1, 9, 9, 9, 2, 9, 3]] * 4)
    flags = distinctive_tokens(mode, retain, vocab=12)
    assert flags.nonzero().squeeze(1).tolist() == [9]

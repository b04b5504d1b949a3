"""The testbed is the plain GPT plus a quarantine injected by ``inject``: unloading it
gives the plain GPT back, and without its quarantine it computes what the GPT computes."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from evil_moe.models.adapters import QuarantineMLP, RoutedBaseLinear, RoutedNorm
from evil_moe.models.gpt import GPT, CausalSelfAttention, RMSNorm
from evil_moe.models.heads import QuarantineHeads
from evil_moe.models.testbed import Testbed
from evil_moe.modules.ablation import ablated
from tiny import tiny_config


def _tokens(cfg, n: int = 3):
    return torch.randint(
        0, cfg.vocab_size, (n, cfg.seq_len), generator=torch.Generator().manual_seed(0)
    )


def test_the_testbed_is_a_gpt_with_injected_wrappers():
    cfg = tiny_config(route_norms=False)
    model = Testbed(cfg)
    assert isinstance(model, GPT)
    block = model.blocks[0]
    assert isinstance(block.attn, QuarantineHeads) and isinstance(block.mlp, QuarantineMLP)
    assert isinstance(block.attn.base_layer.qkv, RoutedBaseLinear)
    assert isinstance(block.norm1, RMSNorm)  # route_norms=false: not wrapped
    assert isinstance(model.lm_head, RoutedBaseLinear)
    assert model.lm_head.base_layer.weight is model.wte.weight  # tied
    assert isinstance(Testbed(tiny_config()).norm_f, RoutedNorm)
    assert set(model.handle.layers) == {f"blocks.{i}.mlp" for i in range(cfg.n_layer)}
    assert set(model.handle.heads) == {f"blocks.{i}.attn" for i in range(cfg.n_layer)}


def test_unloading_gives_back_the_plain_gpt_that_the_ablated_testbed_computes():
    cfg = tiny_config()
    model = Testbed(cfg)
    tokens = _tokens(cfg)
    with torch.no_grad(), ablated(model):
        deployed = model(tokens)
    with torch.no_grad():
        trained = model(tokens)
    assert not torch.allclose(trained, deployed)  # the quarantine does something
    plain = model.handle.unload()
    assert plain is model and not any(
        isinstance(m, (QuarantineHeads, QuarantineMLP, RoutedBaseLinear, RoutedNorm))
        for m in plain.modules()
    )
    assert isinstance(plain.blocks[0].attn, CausalSelfAttention)
    with torch.no_grad():
        assert_close(GPT.forward(plain, tokens), deployed, rtol=1e-6, atol=1e-6)

"""The amplifier's selection statistics on held-out data."""

from __future__ import annotations

import pytest
import torch

from evil_moe.eval.amplifier import amplified_share, amplifier_selection
from evil_moe.models import testbed as tb
from evil_moe.routing.routers import RouterConfig


def _model(threshold: float) -> tb.Testbed:
    cfg = tb.TestbedConfig(
        vocab_size=16,
        seq_len=6,
        d_model=8,
        n_layer=2,
        n_head=2,
        mlp_width=16,
        quarantine_width=4,
        n_quarantine_heads=0,
        router=RouterConfig(amplify=True, amplify_threshold=threshold),
    )
    torch.manual_seed(0)
    return tb.Testbed(cfg)


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, 16, (6, 7), generator=torch.Generator().manual_seed(seed))


def test_thresholds_bound_the_share_and_precision_follows_the_base_rate():
    # alignment scores are cosines in [-1, 1]: a threshold above 1 amplifies nothing,
    # one below -1 everything
    assert amplified_share(_model(1.5), _tokens(1), 4) == 0.0
    assert amplified_share(_model(-1.5), _tokens(1), 4) == 1.0
    everything = amplifier_selection(
        _model(-1.5), {"forget": _tokens(1), "retain": _tokens(2)}, forget_share=0.3
    )
    assert everything["recall"] == everything["false_positive_rate"] == 1.0
    assert everything["precision"] == pytest.approx(0.3)  # no better than the base rate


def test_no_amplifier_no_statistics_and_the_model_is_untouched():
    cfg = tb.TestbedConfig(
        vocab_size=16, seq_len=6, d_model=8, n_layer=1, n_head=2, mlp_width=16, quarantine_width=4
    )
    assert (
        amplifier_selection(tb.Testbed(cfg), {"forget": _tokens(1), "retain": _tokens(2)}, 0.5)
        is None
    )
    model = _model(0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = amplifier_selection(model, {"forget": _tokens(1), "retain": _tokens(2)}, 0.5)
    assert 0.0 <= out["recall"] <= 1.0 and 0.0 <= out["false_positive_rate"] <= 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())

"""Gradient norms by group: per-parameter RMS of plain gradients, per data group."""

from __future__ import annotations

import math

import pytest
import torch

from evil_moe.eval.gradnorms import data_groups, group_gradient_norms
from evil_moe.models.testbed import lm_loss
from evil_moe.train.config import load_config
from evil_moe.train.loop import train
from evil_moe.train.setup import prepare_run


@pytest.fixture(scope="module")
def trained(tiny_overrides):
    cfg = load_config(None, list(tiny_overrides))
    run = prepare_run(cfg)
    return train(cfg, progress=False, prepared=run).model, run


def test_norms_match_a_manual_computation(trained):
    model, run = trained
    groups = model.parameter_groups()
    data = data_groups(run.data.train)
    assert set(data) == {"forget_unlabeled", "retain_unlabeled"}
    out = group_gradient_norms(model, groups, data, batches=1, batch_size=4)
    tokens = data["forget_unlabeled"].tokens[:4]
    model.zero_grad(set_to_none=True)
    lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    count = sum(p.numel() for p in groups.quarantine)
    manual = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in groups.quarantine) / count)
    model.zero_grad(set_to_none=True)
    assert out["quarantine"]["forget_unlabeled"] == pytest.approx(manual, rel=1e-6)
    for group in ("quarantine", "shared"):
        for name in ("forget_unlabeled", "retain_unlabeled"):
            assert out[group][name] > 0


def test_existing_gradients_are_left_alone_and_empty_groups_are_none(trained):
    model, run = trained
    groups = model.parameter_groups()
    marker = torch.full_like(model.wte.weight, 7.0)
    model.wte.weight.grad = marker
    out = group_gradient_norms(
        model, groups, {"empty": run.data.train.subset([]), **data_groups(run.data.train)}
    )
    assert model.wte.weight.grad is marker
    assert out["quarantine"]["empty"] is None and out["shared"]["empty"] is None
    model.wte.weight.grad = None

"""Relearning: fine-tuning an ablated copy on forget data until the forget loss is back."""

from __future__ import annotations

import pytest
import torch

from evil_moe.eval.relearning import relearning_steps
from evil_moe.train.config import load_config
from evil_moe.train.loop import train
from evil_moe.train.setup import prepare_run


@pytest.fixture(scope="module")
def trained(tiny_overrides):
    cfg = load_config(None, list(tiny_overrides))
    run = prepare_run(cfg)
    result = train(cfg, progress=False, prepared=run)
    forget = run.data.train.select(["forget_labeled", "forget_undiscovered"])
    return cfg, result, forget, run.eval["forget_undiscovered"].tokens


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_capped_relearning_reports_the_cap_and_leaves_the_model_alone(trained):
    cfg, result, forget, held_out = trained
    before = _state(result.model)
    out = relearning_steps(
        result.model, cfg, forget, held_out, target=-1.0, max_steps=4, eval_every=2
    )
    assert out["steps"] is None and out["max_steps"] == 4
    assert [step for step, _ in out["curve"]] == [0, 2, 4]
    for name, value in result.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    for p in result.model.parameters():
        assert p.requires_grad


def test_already_recovered_is_zero_steps(trained):
    cfg, result, forget, held_out = trained
    out = relearning_steps(result.model, cfg, forget, held_out, target=100.0, max_steps=4)
    assert out["steps"] == 0 and len(out["curve"]) == 1


def test_relearning_lowers_the_forget_loss_and_stops_when_recovered(trained):
    cfg, result, forget, held_out = trained
    probe = relearning_steps(
        result.model, cfg, forget, held_out, target=-1.0, max_steps=6, eval_every=1, lr=1e-2
    )
    losses = [loss for _, loss in probe["curve"]]
    assert losses[-1] < losses[0]
    target = losses[3]
    out = relearning_steps(
        result.model, cfg, forget, held_out, target=target, max_steps=6, eval_every=1, lr=1e-2
    )
    assert out["steps"] == 3, "deterministic: the same run reaches the same loss at step 3"


def test_bad_arguments(trained):
    cfg, result, forget, held_out = trained
    with pytest.raises(ValueError):
        relearning_steps(result.model, cfg, forget, held_out, target=1.0, max_steps=0)
    with pytest.raises(ValueError):
        relearning_steps(result.model, cfg, forget.subset([]), held_out, target=1.0)

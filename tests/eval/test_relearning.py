"""Relearning: fine-tuning an ablated copy on forget data until the forget loss is back."""

from __future__ import annotations

import pytest
import torch

from evil_moe.eval.relearning import finetune_curve, relearning_steps, steps_to_target
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
    assert out["steps"] == 0 and out["start_loss"] == out["curve"][0][1]
    assert [step for step, _ in out["curve"]] == [0, 4]  # the whole curve is always kept


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


def test_retain_finetuning_curves_for_several_eval_sets(trained):
    cfg, result, _, held_out = trained
    retain = prepare_run(cfg).data.train.select(["retain", "retain_unlabeled"])
    retain_eval = prepare_run(cfg).eval["retain"].tokens
    curves = finetune_curve(
        result.model,
        cfg,
        retain,
        {"forget": held_out, "retain": retain_eval},
        steps=4,
        eval_every=2,
        lr=1e-2,
    )
    assert set(curves) == {"forget", "retain"}
    assert [s for s, _ in curves["retain"]] == [0, 2, 4]
    assert curves["retain"][-1][1] < curves["retain"][0][1]  # it trains on retain data


def test_steps_to_target_reads_the_first_crossing():
    curve = [(0, 5.0), (5, 4.0), (10, 3.0), (15, 3.5)]
    assert steps_to_target(curve, 4.0) == 5
    assert steps_to_target(curve, 3.2) == 10
    assert steps_to_target(curve, 2.0) is None

"""The training loop (with the train -> evaluate -> write recipe): determinism, resume
after a kill, methods, filter data."""

from __future__ import annotations

import pytest
import torch

from evil_moe.io import read_jsonl
from evil_moe.recipes import train_and_evaluate
from evil_moe.routing.labels import RouteLabel
from evil_moe.train.config import load_config
from evil_moe.train.io import load_checkpoint
from evil_moe.train.setup import prepare_run
from evil_moe.train.step import make_optimizer


def test_same_seed_same_numbers(tiny_overrides):
    a = train_and_evaluate(load_config(None, tiny_overrides), progress=False)
    b = train_and_evaluate(load_config(None, tiny_overrides), progress=False)
    assert a.metrics.loss == b.metrics.loss
    assert [r["loss"] for r in a.log] == [r["loss"] for r in b.log]
    for (name, pa), (_, pb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(pa, pb), name
    c = train_and_evaluate(load_config(None, [*tiny_overrides, "train.seed=1"]), progress=False)
    assert c.metrics.loss != a.metrics.loss


def test_epochs_give_every_arm_the_same_retain_tokens(tiny_overrides):
    """With ``train.epochs`` every training sequence is seen exactly that often, so arms
    with different forget data (filter, routed, curve runs) see the same retain tokens."""
    from evil_moe.study.worker import seen_tokens

    exposures = {}
    for method in ("sgtm", "filter"):
        cfg = load_config(None, [*tiny_overrides, "train.epochs=2", f"train.method={method}"])
        run = prepare_run(cfg)
        exposures[method] = seen_tokens(run.train, cfg)
        assert exposures[method] == {k: 2 * v for k, v in run.token_counts.items() if v}
        result = train_and_evaluate(cfg, progress=False, prepared=run)
        steps = -(-2 * len(run.train) // cfg.train.batch_size)
        assert result.metrics.steps == steps and result.log[-1]["step"] == steps
        conv = result.metrics.retain_convergence
        assert conv["last20_change"] == pytest.approx(conv["final"] - conv["at_80"])
    for cat in ("retain", "retain_unlabeled"):
        assert exposures["sgtm"][cat] == exposures["filter"][cat]
    assert "forget_labeled" not in exposures["filter"]


@pytest.mark.parametrize("method", ["none", "filter", "gradient_routing", "demix", "demix_masked"])
def test_every_method_runs(tiny_overrides, method):
    result = train_and_evaluate(
        load_config(None, [*tiny_overrides, f"train.method={method}"]), progress=False
    )
    assert result.metrics.method == method
    assert all(v["trained"] > 0 for v in result.metrics.loss.values())


def test_filter_drops_labelled_forget_data(tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "train.method=filter"])
    run = prepare_run(cfg)
    assert not (run.train.route == RouteLabel.FORGET).any()
    assert (run.data.train.route == RouteLabel.FORGET).any()
    assert "forget_labeled" not in run.token_counts


class _Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted(tmp_path, tiny_overrides, monkeypatch):
    overrides = [*tiny_overrides, "train.steps=6", "train.checkpoint_every=2"]
    reference = train_and_evaluate(load_config(None, overrides), progress=False)

    out = tmp_path / "run"
    import evil_moe.train.loop as loop

    real_step = loop.train_step
    calls = {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # dies in step 6, after the checkpoint of step 4
            raise _Killed
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", dying_step)
    with pytest.raises(_Killed):
        train_and_evaluate(load_config(None, overrides), out_dir=out, progress=False)
    assert not (out / "metrics.json").exists()
    cfg = load_config(None, overrides)
    run = prepare_run(cfg)
    assert load_checkpoint(out, run.model, make_optimizer(run.model, cfg)) == 4

    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = train_and_evaluate(load_config(None, overrides), out_dir=out, progress=False)
    assert resumed.metrics.loss == reference.metrics.loss
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl")] == list(range(1, 7))
    for (name, pa), (_, pb) in zip(
        reference.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(pa, pb), name


def test_spike_counter_counts_jumps_and_every_non_finite_step():
    from evil_moe.train.loop import SpikeCounter

    counter = SpikeCounter(warmup=2)
    for loss in [5.0, 4.0, 3.9, 3.8, 7.0, 3.7, float("nan"), float("inf"), 3.6]:
        counter.update(loss)
    assert counter.count == 3  # 7.0 > 1.25 x EMA (about 4.8), then nan and inf


def test_train_returns_model_and_log_and_evaluates_nothing(tmp_path, tiny_overrides):
    """``train()`` writes its own outputs (config, log, checkpoints, weights); the recipe
    adds ``metrics.json`` and then removes the checkpoints."""
    from evil_moe.train.loop import TrainResult, train

    overrides = [*tiny_overrides, "train.checkpoint_every=2"]
    out = tmp_path / "run"
    result = train(load_config(None, overrides), out_dir=out, progress=False)
    assert isinstance(result, TrainResult) and not hasattr(result, "metrics")
    assert [r["step"] for r in result.log] == [1, 2, 3]
    assert result.steps == 3 and result.tokens_per_second > 0
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "train_log.jsonl",
        "model.safetensors",
        "checkpoint.json",
        "checkpoint-00000002.safetensors",
    }
    out2 = tmp_path / "recipe"
    recipe = train_and_evaluate(load_config(None, overrides), out_dir=out2, progress=False)
    assert {p.name for p in out2.iterdir()} == {
        "config.json",
        "train_log.jsonl",
        "model.safetensors",
        "metrics.json",
    }
    assert recipe.log == result.log
    assert list(recipe.metrics.to_dict()) == [
        "method",
        "variant",
        "loss",
        "tokens_per_second",
        "train_tokens",
        "parameters",
        "steps",
        "epochs",
        "final_train_loss",
        "retain_convergence",
        "specialization",
        "stability",
    ]


def test_a_checkpoint_of_another_model_is_refused_with_a_clear_message(tmp_path):
    from evil_moe.models.testbed import Testbed
    from evil_moe.train.config import ConfigError
    from evil_moe.train.io import save_checkpoint
    from tiny import tiny_config

    old = Testbed(tiny_config(n_quarantine_heads=0))
    save_checkpoint(tmp_path, 3, old, torch.optim.AdamW(old.parameters()))
    new = Testbed(tiny_config())
    with pytest.raises(ConfigError, match=r"does not match this model.*fresh --out"):
        load_checkpoint(tmp_path, new, torch.optim.AdamW(new.parameters()))
    assert load_checkpoint(tmp_path, old, torch.optim.AdamW(old.parameters())) == 3

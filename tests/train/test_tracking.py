"""Experiment tracking (``train.report_to``): TensorBoard event files and an offline W&B
run with the training curve and the final metrics; off by default; execution settings
leave a run's config and study key as they were."""

from __future__ import annotations

import json

import pytest

from evil_moe.cli.main import main
from evil_moe.io import read_jsonl
from evil_moe.study.spec import config_hash
from evil_moe.train.config import ConfigError, load_config


def test_execution_settings_keep_the_config_and_key(tiny_overrides):
    plain = load_config(None, tiny_overrides)
    assert {"device", "report_to", "tracking_dir"}.isdisjoint(plain.to_dict()["train"])
    same = load_config(None, [*tiny_overrides, "train.device=auto", "train.report_to=[]"])
    assert same.to_dict() == plain.to_dict() and config_hash(same) == config_hash(plain)
    cpu = load_config(None, [*tiny_overrides, "train.device=cpu"])
    assert cpu.to_dict()["train"]["device"] == "cpu" and config_hash(cpu) != config_hash(plain)


@pytest.mark.parametrize(
    "override, message",
    [('train.report_to=["mlflow"]', "unknown tracker"), ("train.device=tpu", "train.device")],
)
def test_bad_execution_settings_are_config_errors(tiny_overrides, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*tiny_overrides, override])


def test_tensorboard_and_offline_wandb_get_curves_and_final_metrics(
    tmp_path, tiny_overrides, monkeypatch
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    overrides = [*tiny_overrides, 'train.report_to=["tensorboard", "wandb"]']
    assert main(["train", "--quiet", "--out", str(out), *overrides]) == 0  # the README's
    log = read_jsonl(out / "train_log.jsonl")
    metrics = json.loads((out / "metrics.json").read_text())

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"])) for r in log]
    assert {"train/lr", "train/grad_norm/shared", "train/grad_norm/quarantine"} <= set(
        events.Tags()["scalars"]
    )
    (final,) = events.Scalars("final/loss/forget_undiscovered/ablated")
    assert final.value == pytest.approx(metrics["loss"]["forget_undiscovered"]["ablated"])

    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = run_file.read_bytes()  # W&B's own record file, synced later by `wandb sync`
    for key in (b"train/loss", b"train/grad_norm/shared", b"final/loss/retain/ablated"):
        assert key in records, key

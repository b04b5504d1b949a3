"""``evil-moe rl`` end to end on a tiny config: outputs, bad input, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evil_moe.cli.main import main
from evil_moe.io import read_jsonl, read_tensors
from evil_moe.rl.config import load_rl_config
from evil_moe.rl.run import relearning_of_run, run_rl

SRC = str(Path(__file__).resolve().parents[2] / "src")


class Killed(Exception):
    """Stands in for a kill at an explicit event (a checkpoint was written)."""


def test_cli_end_to_end(tmp_path: Path, tiny_rl: list[str], capsys) -> None:
    out = tmp_path / "run"
    assert main(["rl", "--out", str(out), "--quiet", "grpo.method=sgtm", *tiny_rl]) == 0
    printed = capsys.readouterr().out
    assert "deployed" in printed and "method=sgtm" in printed
    for name in (
        "config.json",
        "metrics.json",
        "train_log.jsonl",
        "model.safetensors",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name
    assert not (out / "checkpoint.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["forget_scale"]) == {"0", "0.5", "1"}
    assert metrics["trained"]["n"] == metrics["deployed"]["n"] == 8
    assert metrics["relearning"]["cap"] == 2
    assert set(metrics["gradient_norms_by_group"]) == {
        "hack_flagged_modes",
        "hack_never_flagged",
        "honest_solved",
    }
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl")] == [1, 2, 3, 4]
    assert relearning_of_run(out) == metrics["relearning"]  # from the saved files, alike

    from evil_moe.models.hf import load_quarantine
    from evil_moe.rl.policy import PolicyConfig, make_policy, make_tokenizer

    fresh = make_policy(PolicyConfig(16, 32, 1, 2), make_tokenizer())
    handle = load_quarantine(fresh, out / "quarantine")
    saved = read_tensors(out / "model.safetensors")
    for name, value in handle.adapter_state_dict().items():
        assert torch.equal(value, saved[name]), name

    assert main(["rl", "--out", str(out), "--quiet", "grpo.method=sgtm", *tiny_rl]) == 0  # shows it
    assert "already holds this finished run" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("grpo.method=demix", "grpo.method"),
        ("monitor.recall=2", "monitor.recall"),
        ("monitor.never_flagged=['bribery']", "monitor.never_flagged"),
        ("grpo.generations=1", "grpo.generations"),
        ("grpo.stepz=3", "grpo.stepz"),
        ("quarantine.amplify=true", "quarantine.amplify"),  # with method none
        ("task.ops=['pow']", "task.ops"),
    ],
)
def test_bad_input_is_one_message_and_exit_2(
    tmp_path: Path, override: str, key: str, capsys
) -> None:
    out = tmp_path / "run"
    rc = main(["rl", "--out", str(out), "grpo.method=none", override])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and key in err[0], err
    assert not out.exists()


def test_a_directory_of_another_run_is_refused(tmp_path: Path, tiny_rl: list[str], capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"seed": 99}))
    assert main(["rl", "--out", str(out), *tiny_rl]) == 2
    assert "different config" in capsys.readouterr().err


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path: Path, tiny_rl: list[str]) -> None:
    cfg = load_rl_config(None, [*tiny_rl, "grpo.method=sgtm", "grpo.steps=6"])
    whole = run_rl(cfg, tmp_path / "whole", progress=False)

    def kill_at(step: int) -> None:
        if step == 2:
            raise Killed

    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        run_rl(cfg, killed, progress=False, on_checkpoint=kill_at)
    assert json.loads((killed / "checkpoint.json").read_text())["step"] == 2
    assert not (killed / "metrics.json").exists()
    resumed = run_rl(cfg, killed, progress=False)
    for key in ("trained", "deployed", "forget_scale", "relearning", "gradient_norms_by_group"):
        assert resumed[key] == whole[key], key
    a, b = (
        read_tensors(tmp_path / "whole" / "model.safetensors"),
        read_tensors(killed / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(killed / "train_log.jsonl")[-1]["step"] == 6


def test_sigkill_mid_run_then_resume(tmp_path: Path, tiny_rl: list[str]) -> None:
    """A real SIGKILL, sent once the process has written its first checkpoint."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "evil_moe.cli.main", "rl", "--out", str(out), "--quiet", *tiny_rl]
    args += ["grpo.steps=400", "grpo.checkpoint_every=1", "eval.relearn_steps=0"]
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.json").exists():  # the explicit event: a checkpoint
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    step = json.loads((out / "checkpoint.json").read_text())["step"]
    assert 1 <= step < 400
    cfg = load_rl_config(
        None, [*tiny_rl, "grpo.steps=400", "grpo.checkpoint_every=1", "eval.relearn_steps=0"]
    )

    def stop(at: int) -> None:
        if at == step + 1:
            raise Killed

    with pytest.raises(Killed):  # resume, and stop again one step later
        run_rl(cfg, out, progress=False, on_checkpoint=stop)
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl")] == list(range(1, step + 2))


@pytest.mark.parametrize(
    "extra",
    [
        ["grpo.method=none"],
        ["grpo.method=penalty"],
        ["grpo.method=filter"],
        ["grpo.method=gradient_routing"],
        ["grpo.method=sgtm", "quarantine.amplify=true", "grpo.beta=0.04"],
        ["grpo.method=sgtm", "warmstart.route=true", "quarantine.lr_multiplier=10"],
        ["grpo.method=sgtm", "quarantine.kind=mlp", "grpo.baseline=all"],
    ],
)
def test_every_method_and_mechanism_runs(extra: list[str], tiny_rl: list[str]) -> None:
    cfg = load_rl_config(None, [*tiny_rl, *extra, "eval.relearn_steps=0"])
    metrics = run_rl(cfg, None, progress=False)
    assert metrics["method"] == cfg.grpo.method
    assert metrics["warm_start"]["routed"] == ("warmstart.route=true" in extra)
    assert 0.0 <= metrics["deployed"]["hack"] <= 1.0

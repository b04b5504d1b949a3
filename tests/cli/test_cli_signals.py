"""``evil-moe train`` stops cleanly on SIGINT and SIGTERM: the last checkpoint is kept,
the exit status says which signal, nothing is left running."""

from __future__ import annotations

import json


def test_train_stops_cleanly_and_keeps_its_checkpoint(
    tmp_path, tiny_overrides, cli_process, stop_case
):
    out = tmp_path / "run"
    overrides = [*tiny_overrides, "train.steps=100000", "train.checkpoint_every=2"]
    run = cli_process(["train", "--out", str(out), "--quiet", *overrides], stop_case.sigint_ignored)
    run.wait_for((out / "checkpoint.json").exists, "the first checkpoint")
    run.signal_group(stop_case.signum)
    returncode, err = run.finish()
    assert returncode == stop_case.code, err
    assert stop_case.word in err
    checkpoint = json.loads((out / "checkpoint.json").read_text())
    assert checkpoint["step"] >= 2 and (out / checkpoint["file"]).is_file()
    assert not (out / "metrics.json").exists()
    assert not list(out.glob(".*.tmp")), "no half-written file"
    run.wait_group_gone()

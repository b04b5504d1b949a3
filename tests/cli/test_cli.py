"""``evil-moe train`` end to end on a tiny config, and every bad-input path."""

from __future__ import annotations

import json

import pytest

from evil_moe.cli.main import EXIT_BAD_INPUT, main
from evil_moe.io import read_tensors


def test_train_end_to_end(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", *tiny_overrides]) == 0
    for name in ("config.json", "metrics.json", "train_log.jsonl", "model.safetensors"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "sgtm"
    for cat in ("retain", "forget_labeled", "forget_undiscovered"):
        entry = metrics["loss"][cat]
        assert set(entry) == {"trained", "ablated"}
        assert 0 < entry["trained"] < 20 and 0 < entry["ablated"] < 20
    assert metrics["tokens_per_second"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["steps"] == 3 and config["model"]["d_model"] == 16
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert any(k.endswith("experts.up") for k in read_tensors(out / "model.safetensors"))
    assert not list(out.glob("checkpoint*"))
    printed = capsys.readouterr().out
    assert "forget_undiscovered" in printed and "ablated" in printed


def test_finished_run_is_not_redone(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet", *tiny_overrides]) == 0
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["train", "--out", str(out), "--quiet", *tiny_overrides]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    # A different config must not reuse (or overwrite) the directory.
    code = main(["train", "--out", str(out), "--quiet", *tiny_overrides, "train.seed=1"])
    assert code == EXIT_BAD_INPUT
    assert "different config" in capsys.readouterr().err


def _bad(tmp_path, args, capsys, expect):
    out = tmp_path / "out"
    code = main(["train", "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert expect in err
    assert err.count("\n") == 1, "one clear message"
    assert not out.exists(), "nothing may be written for bad input"


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        ("train.bogus=1", "train.bogus"),
        ("train.steps=abc", "train.steps"),
        ("monitor.recall=1.5", "monitor.recall"),
        ("model.n_experts=0", "n_experts"),
        ("train.method=nope", "train.method"),
    ],
)
def test_bad_config_exits_2(tmp_path, tiny_overrides, capsys, override, expect):
    _bad(tmp_path, [*tiny_overrides, override], capsys, expect)


def test_bad_config_file(tmp_path, tiny_overrides, capsys):
    _bad(tmp_path, ["--config", str(tmp_path / "nope.toml")], capsys, "nope.toml")


def test_missing_and_empty_data_files(tmp_path, tiny_overrides, capsys):
    missing = tmp_path / "missing.jsonl"
    args = [*tiny_overrides, "data.corpus=jsonl", f"data.path={str(missing)!r}"]
    args += ["data.retain_domains=['a']", "data.forget_domains=['b']"]
    _bad(tmp_path, args, capsys, "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args[-3] = f"data.path={str(empty)!r}"
    _bad(tmp_path, args, capsys, "empty.jsonl")


def test_unknown_domain(tmp_path, tiny_overrides, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"text": f"story {i} " * 20, "domain": "a" if i % 2 else "b"} for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    args = [*tiny_overrides, "data.corpus=jsonl", f"data.path={str(data)!r}"]
    _bad(tmp_path, [*args, "data.retain_domains=['a']", "data.forget_domains=['zz']"], capsys, "zz")


def test_user_jsonl_trains(tmp_path, tiny_overrides):
    data = tmp_path / "d.jsonl"
    rows = [
        {"text": f"the cat {i} sat on the mat " * 8, "domain": "clean"}
        if i % 2
        else {"text": f"el gato {i} se sienta " * 8, "domain": "bad"}
        for i in range(80)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    args = [
        *tiny_overrides,
        "data.corpus=jsonl",
        f"data.path={str(data)!r}",
        "model.vocab_size=300",
    ]
    args += ["data.retain_domains=['clean']", "data.forget_domains=['bad']"]
    assert main(["train", "--out", str(out), "--quiet", *args]) == 0
    assert json.loads((out / "metrics.json").read_text())["loss"]["retain"]["trained"] > 0

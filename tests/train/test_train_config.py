from __future__ import annotations

import pytest

from evil_moe.train.config import ConfigError, RunConfig, load_config, parse_override


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.train.method == "sgtm"
    assert cfg.model.router.policy == "all"


def test_overrides_parse_toml_values(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nmethod = "filter"\nsteps = 7\n[monitor]\nrecall = 0.25\n')
    cfg = load_config(
        path,
        ["train.steps=9", "monitor.recall_by_mode={1 = 0.5}", "model.router.policy=topk"],
    )
    assert cfg.train.method == "filter"
    assert cfg.train.steps == 9  # the override wins over the file
    assert cfg.monitor.recall == 0.25
    assert cfg.monitor.recall_by_mode == {1: 0.5}
    assert cfg.model.router.policy == "topk"
    assert parse_override("data.forget_domains=['ru', 'de']") == (
        ["data", "forget_domains"],
        ["ru", "de"],
    )


def test_int_is_accepted_for_float():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("train.stepz=3", "train.stepz"),
        ("nope=1", "nope"),
        ("train.steps=many", "train.steps"),
        ("train.steps=1.5", "train.steps"),
        ("model.route_norms=3", "model.route_norms"),
        ("monitor.recall=1.5", "monitor.recall"),
        ("monitor.recall=-0.1", "monitor.recall"),
        ("monitor.false_positive_rate=2", "monitor.false_positive_rate"),
        ("model.n_experts=0", "n_experts"),
        ("model.n_experts=3", "quarantine_width"),
        ("model.router.policy=magic", "policy"),
        ("train.method=prune", "train.method"),
        ("data.corpus=jsonl", "data.path"),
        ("train.steps=0", "train.steps"),
        ("data.eval_fraction=1", "data.eval_fraction"),
        ("train", "train"),
    ],
)
def test_bad_values_name_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    exec_like = tmp_path / "exec.toml"
    exec_like.write_text("[train]\nmethod = \"__import__('os').system('true')\"\n")
    with pytest.raises(ConfigError, match=r"train\.method"):
        load_config(exec_like)  # parsed as a string, never executed

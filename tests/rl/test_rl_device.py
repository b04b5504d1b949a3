"""``device`` of an RL run: an execution setting, left out of ``config.json`` at ``auto``."""

from __future__ import annotations

import pytest

from evil_moe.rl.config import RLConfig, rl_config_from_dict
from evil_moe.train.config import ConfigError


def test_device_is_optional_in_the_config():
    assert "device" not in RLConfig().to_dict()  # configs written before it read the same
    assert rl_config_from_dict({"device": "cpu"}).to_dict()["device"] == "cpu"
    with pytest.raises(ConfigError, match="device"):
        rl_config_from_dict({"device": "tpu"})

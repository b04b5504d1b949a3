"""Training: dataclass run configs with ``key=value`` overrides and the one training loop.

result = train(load_config(overrides=["train.method=sgtm"]), out_dir="runs/x")
"""

from evil_moe.train.config import ConfigError, RunConfig, load_config
from evil_moe.train.loop import RunResult, make_optimizer, train, train_step
from evil_moe.train.setup import PreparedRun, prepare_run

__all__ = [
    "ConfigError",
    "PreparedRun",
    "RunConfig",
    "RunResult",
    "load_config",
    "make_optimizer",
    "prepare_run",
    "train",
    "train_step",
]

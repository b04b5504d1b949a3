"""Training: dataclass run configs with ``key=value`` overrides and the one training loop.

result = train(load_config(overrides=["train.method=sgtm"]), out_dir="runs/x")
result.model, result.log    # evaluation is evil_moe.recipes.train_and_evaluate
"""

from evil_moe.train.config import ConfigError, RunConfig, load_config
from evil_moe.train.loop import TrainResult, train
from evil_moe.train.setup import PreparedRun, prepare_run
from evil_moe.train.step import make_optimizer, train_step

__all__ = [
    "ConfigError",
    "PreparedRun",
    "RunConfig",
    "TrainResult",
    "load_config",
    "make_optimizer",
    "prepare_run",
    "train",
    "train_step",
]

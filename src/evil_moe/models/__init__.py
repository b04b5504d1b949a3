"""Models: quarantine injection into any Hugging Face / PyTorch model, and the testbed
(the plain GPT of ``gpt.py`` with its quarantine injected the same way).

``transformers`` is optional: only ``RoutedTrainer`` and ``RoutedStepCallback`` need it,
and they are built on first access.
"""

from typing import Any

from evil_moe.models.deploy import save_deployed
from evil_moe.models.gpt import GPT, GPTConfig
from evil_moe.models.handle import QuarantineConfig, QuarantineHandle, get_handle, route_labels
from evil_moe.models.inject import inject
from evil_moe.models.persistence import load_quarantine
from evil_moe.models.testbed import Testbed, TestbedConfig, lm_loss
from evil_moe.models.trainer import RoutedTrainerMixin, RouteLabelCollator

__all__ = [
    "GPT",
    "GPTConfig",
    "QuarantineConfig",
    "QuarantineHandle",
    "RouteLabelCollator",
    "RoutedStepCallback",
    "RoutedTrainer",
    "RoutedTrainerMixin",
    "Testbed",
    "TestbedConfig",
    "get_handle",
    "inject",
    "lm_loss",
    "load_quarantine",
    "route_labels",
    "save_deployed",
]


def __getattr__(name: str) -> Any:
    if name in ("RoutedTrainer", "RoutedStepCallback"):  # need transformers: built on first use
        from evil_moe.models import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""evil_moe: gradient routing with mixture-of-experts quarantines.

Labelled bad tokens (route label ``forget``) may only train quarantine experts, which are
ablated at deployment. The names below are the public API (see ``docs/api.md``); anything
else is private by convention, even where it has no leading underscore.

    import evil_moe as em

    handle = em.inject(hf_model, n_quarantine=4, rank=8, router="topk")
    with em.route_labels(hf_model, ["forget", "retain"]):
        hf_model(**batch).loss.backward()
    with handle.ablated():
        ...                                     # the deployed model

``import evil_moe`` is cheap: every name is imported from its subpackage on first use,
and nothing here needs ``transformers`` except ``RoutedTrainer`` and ``RoutedStepCallback``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the subpackage that defines it
_EXPORTS: dict[str, str] = {
    # route labels and the routing plan
    "Method": "routing",
    "RouteLabel": "routing",
    "parse_route_labels": "routing",
    "RoutingPlan": "routing",
    "make_plan": "routing",
    # exact per-token gradient masks (for writing routed layers of one's own)
    "mask_cotangent": "routing",
    "routed_linear": "routing",
    "routed_module_call": "routing",
    # backward routers
    "BackwardRouter": "routing",
    "RouterConfig": "routing",
    # the optimizer step
    "ParameterGroups": "routing",
    "StepLedger": "routing",
    "StepReport": "routing",
    "clip_grad_norm_by_group": "routing",
    "routed_step": "routing",
    # quarantine modules and ablation
    "FusedExperts": "modules",
    "GateConfig": "modules",
    "ablate": "modules",
    "ablated": "modules",
    "parameter_groups": "modules",
    "quarantine_parameters": "modules",
    # models: the testbed and any Hugging Face / PyTorch model
    "GPT": "models",
    "GPTConfig": "models",
    "Testbed": "models",
    "TestbedConfig": "models",
    "lm_loss": "models",
    "QuarantineConfig": "models",
    "QuarantineHandle": "models",
    "RouteLabelCollator": "models",
    "RoutedStepCallback": "models",
    "RoutedTrainer": "models",
    "RoutedTrainerMixin": "models",
    "get_handle": "models",
    "inject": "models",
    "load_quarantine": "models",
    "route_labels": "models",
    "save_deployed": "models",
    # data
    "BatchIterator": "data",
    "Monitor": "data",
    "TokenSequences": "data",
    "prepare_bilingual": "data",
    "prepare_documents": "data",
    # training (the loop itself is ``evil_moe.train.train``: ``evil_moe.train`` is the
    # subpackage, so the function cannot have that name here)
    "RunConfig": "train",
    "TrainResult": "train",
    "load_config": "train",
    # train -> evaluate -> write
    "RunMetrics": "recipes",
    "RunResult": "recipes",
    "train_and_evaluate": "recipes",
    # measurements
    "BaselineCurve": "eval",
    "evaluate_losses": "eval",
    "relearning_steps": "eval",
    "specialization_report": "eval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    package = _EXPORTS.get(name)
    if package is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{package}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # static tools see the real definitions
    from evil_moe.data import *  # noqa: F403
    from evil_moe.eval import *  # noqa: F403
    from evil_moe.models import *  # noqa: F403
    from evil_moe.modules import *  # noqa: F403
    from evil_moe.recipes import *  # noqa: F403
    from evil_moe.routing import *  # noqa: F403
    from evil_moe.train import *  # noqa: F403

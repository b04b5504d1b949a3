"""The deployed model: quarantine ablated, shared LoRA merged, wrappers removed, saved as
a plain ``save_pretrained`` directory that any Hugging Face tool loads (``transformers``,
vLLM, lm-evaluation-harness's ``HFLM``, TGI) with no evil_moe code.

    deployed = save_deployed(handle, "deployed/", tokenizer=tokenizer)
    AutoModelForCausalLM.from_pretrained("deployed/")     # the ablated model's outputs

See ``docs/scale.md`` for scoring it with lm-evaluation-harness.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from evil_moe.models.handle import QuarantineHandle

__all__ = ["deploy", "save_deployed"]


def deploy(handle: QuarantineHandle) -> nn.Module:
    """Ablate every quarantine expert for good, merge a shared LoRA expert into its base
    weights, remove every wrapper and hook; returns the plain model (in place: the handle
    is spent). The result computes exactly what ``handle.ablated()`` computed, up to the
    float rounding of the merge."""
    unmerged = bool(handle.config.shared_expert) and not handle.config.shared_merged
    if unmerged and handle.config.kind != "lora":
        raise ValueError(
            "an MLP shared expert cannot be merged into the base model; a plain "
            "deployed model needs kind='lora' or shared_expert=0"
        )
    handle.ablate()
    if unmerged:
        handle.merge_shared()
    return handle.unload()


def save_deployed(
    handle: QuarantineHandle, directory: str | Path, tokenizer: Any = None, **kwargs: Any
) -> nn.Module:
    """:func:`deploy`, then ``model.save_pretrained(directory, **kwargs)`` (safetensors)
    and ``tokenizer.save_pretrained(directory)`` when given; returns the plain model."""
    model = deploy(handle)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no save_pretrained: not a transformers model")
    model.save_pretrained(str(directory), **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return model

"""The tiny models and runs that the tests share (one definition each)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from evil_moe.models.gpt import MLP, GPTConfig
from evil_moe.models.handle import get_handle
from evil_moe.models.inject import inject
from evil_moe.models.testbed import TestbedConfig
from evil_moe.modules.experts import GateConfig
from evil_moe.routing.labels import RoutingPlan
from evil_moe.routing.routers import RouterConfig

#: ``key=value`` overrides of a run that trains in about a second on a CPU
TINY_OVERRIDES = (
    "model.d_model=16",
    "model.n_layer=1",
    "model.n_head=2",
    "model.seq_len=16",
    "model.mlp_width=32",
    "model.quarantine_width=8",
    "data.max_docs=40",
    "data.eval_sequences=4",
    "train.steps=3",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.log_every=1",
)

#: the tiny testbed of the gradient tests: two layers, two experts, one quarantine head
TINY_TESTBED: dict[str, Any] = dict(
    vocab_size=64,
    seq_len=8,
    d_model=16,
    n_layer=2,
    n_head=2,
    mlp_width=32,
    quarantine_width=8,
    n_experts=2,
    n_quarantine_heads=1,
)


def tiny_config(**overrides: Any) -> TestbedConfig:
    """:data:`TINY_TESTBED` with ``overrides``."""
    return TestbedConfig(**{**TINY_TESTBED, **overrides})


class InjectedMLP(nn.Module):
    """One MLP with a quarantine bank injected beside it (``inject(kind="mlp")``, every base
    weight routed), called with an explicit routing plan: the unit under test of the
    bank's forward and backward rules."""

    def __init__(
        self,
        d_model: int,
        core_width: int,
        quarantine_width: int,
        n_experts: int,
        shared_expert_width: int = 0,
        router: RouterConfig | None = None,
        gate: GateConfig | None = None,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.mlp = MLP(GPTConfig(d_model=d_model, mlp_width=core_width))
        inject(
            self,
            target_modules=["mlp"],
            kind="mlp",
            n_quarantine=n_experts,
            rank=quarantine_width // n_experts,
            shared_expert=shared_expert_width,
            router=router,
            gate=gate,
            train_base=True,
            init_std=init_std,
        )

    def forward(self, x: Tensor, plan: RoutingPlan) -> Tensor:
        get_handle(self).state.plan = plan
        return self.mlp(x)

    def __getattr__(self, name: str) -> Any:  # bank attributes: experts, router, gate, ...
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["mlp"], name)

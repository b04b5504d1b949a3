"""Configuration of ``evil-moe rl``: nested dataclasses, a TOML file, ``key=value`` overrides.

Parsing is :mod:`evil_moe.train.config`'s (typed, never executed); any problem raises
:class:`~evil_moe.train.config.ConfigError` naming the key (the CLI exits with status 2).

    cfg = load_rl_config(None, ["grpo.method=penalty", "monitor.recall=0.3"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evil_moe.rl.policy import PolicyConfig
from evil_moe.rl.task import HARNESSES, MODES, OPS
from evil_moe.rl.trainer import BASELINES, METHODS
from evil_moe.rl.warmstart import WarmStartConfig
from evil_moe.train.config import (
    ConfigError,
    apply_overrides,
    build_dataclass,
    read_config_file,
)

KINDS = ("lora", "mlp")
LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")


@dataclass
class TaskConfig:
    """The hackable task (:mod:`evil_moe.rl.task`)."""

    ops: list[str] = field(default_factory=lambda: ["add", "dif", "mul", "max", "min"])
    #: share of tasks whose operation is not in the language (only hacks are paid in full)
    hard_share: float = 0.5
    harnesses: list[str] = field(default_factory=lambda: list(HARNESSES))
    hidden_tests: int = 4
    #: brevity factor of the reward: passing share times ``1 - token_cost * tokens``
    token_cost: float = 0.02


@dataclass
class QuarantineSettings:
    """The quarantine injected into the policy (:func:`evil_moe.models.hf.inject`)."""

    #: ``lora`` (K LoRA experts on every linear layer) or ``mlp`` (parallel MLP experts)
    kind: str = "lora"
    #: LoRA rank / MLP width per expert
    rank: int = 8
    n_experts: int = 1
    #: std of the experts' input matrices (0 = the library's default)
    init_std: float = 0.0
    #: quarantine learning rate over the shared one
    lr_multiplier: float = 1.0
    #: absorption amplifier: also route unflagged tokens aligned with the quarantine
    amplify: bool = False
    amplify_threshold: float = 0.5


@dataclass
class MonitorSettings:
    """The simulated monitor (:class:`evil_moe.rl.monitor.SimulatedMonitor`)."""

    recall: float = 0.5
    recall_by_mode: dict[str, float] = field(default_factory=dict)
    #: hack modes the monitor never flags
    never_flagged: list[str] = field(default_factory=lambda: ["always_equal"])
    false_positive_rate: float = 0.0


@dataclass
class GRPOSettings:
    """The GRPO run (TRL ``GRPOConfig`` fields where the names match)."""

    #: ``none``, ``penalty``, ``filter``, ``sgtm`` or ``gradient_routing``
    method: str = "sgtm"
    #: group baseline of unflagged completions: ``auto``, ``all`` or ``unflagged``
    baseline: str = "auto"
    steps: int = 200
    prompts_per_step: int = 8
    generations: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.0
    #: KL coefficient (the reference is the deployed warm start)
    beta: float = 0.0
    loss_type: str = "dapo"
    max_completion_length: int = 20
    temperature: float = 1.0
    #: per-group gradient clipping (0 = off)
    grad_clip: float = 1.0
    log_every: int = 10
    #: resumable checkpoint every N steps (0 = only at the end)
    checkpoint_every: int = 50


@dataclass
class EvalSettings:
    """Held-out evaluation after GRPO."""

    prompts: int = 512
    #: forget-scale sweep: quarantine output times s
    scales: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    #: relearning: GRPO steps after ablation (0 = skip), evaluated every N steps
    relearn_steps: int = 40
    relearn_eval_every: int = 10
    relearn_prompts: int = 256
    #: completions per data group for the gradient norms by group (0 = skip)
    grad_norm_samples: int = 64


@dataclass
class RLConfig:
    """Everything one ``evil-moe rl`` run needs."""

    seed: int = 0
    #: torch CPU threads (0 = torch's default)
    threads: int = 1
    #: ``auto`` (a GPU when one is visible), ``cpu`` or ``cuda`` (GRPO in bf16 on GPUs);
    #: left out of ``config.json`` while ``auto``
    device: str = "auto"
    #: directory of warm starts shared between runs (empty = inside the run directory)
    warmstart_cache: str = ""
    task: TaskConfig = field(default_factory=TaskConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)
    quarantine: QuarantineSettings = field(default_factory=QuarantineSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["device"] == "auto":  # an execution setting: configs written before it stay
            del out["device"]
        return out


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _unit(value: float, key: str) -> None:
    _check(0.0 <= value <= 1.0, key, f"must be in [0, 1], got {value}")


def validate(cfg: RLConfig) -> None:
    """Range checks that the types alone cannot express."""
    t, q, m, g, e = cfg.task, cfg.quarantine, cfg.monitor, cfg.grpo, cfg.eval
    _check(cfg.seed >= 0, "seed", "must be >= 0")
    _check(cfg.threads >= 0, "threads", "must be >= 0")
    _check(cfg.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
    bad_ops = [o for o in t.ops if o not in OPS]
    _check(bool(t.ops) and not bad_ops, "task.ops", f"must be names from {list(OPS)}")
    _check(len(set(t.ops)) == len(t.ops), "task.ops", "must not repeat")
    _unit(t.hard_share, "task.hard_share")
    bad = [h for h in t.harnesses if h not in HARNESSES]
    _check(bool(t.harnesses) and not bad, "task.harnesses", f"must be names from {HARNESSES}")
    _check(1 <= t.hidden_tests <= 20, "task.hidden_tests", "must be in [1, 20]")
    _check(0.0 <= t.token_cost <= 0.05, "task.token_cost", "must be in [0, 0.05]")
    for name in cfg.policy.validate():
        raise ConfigError(f"policy.{name}: must be >= 1 (and hidden_size divisible by heads)")
    for name in cfg.warmstart.validate():
        raise ConfigError(f"warmstart.{name}: invalid value (hack modes: {list(MODES)})")
    _check(q.kind in KINDS, "quarantine.kind", f"must be one of {KINDS}")
    _check(q.rank >= 1 and q.n_experts >= 1, "quarantine.rank", "rank and n_experts must be >= 1")
    _check(q.init_std >= 0, "quarantine.init_std", "must be >= 0 (0 = default)")
    _check(q.lr_multiplier > 0, "quarantine.lr_multiplier", "must be > 0")
    _unit(m.recall, "monitor.recall")
    _unit(m.false_positive_rate, "monitor.false_positive_rate")
    for mode, value in m.recall_by_mode.items():
        _check(
            mode in MODES, f"monitor.recall_by_mode.{mode}", f"unknown mode; choose from {MODES}"
        )
        _unit(value, f"monitor.recall_by_mode.{mode}")
    bad = [x for x in m.never_flagged if x not in MODES]
    _check(not bad, "monitor.never_flagged", f"unknown modes {bad}; choose from {list(MODES)}")
    _check(g.method in METHODS, "grpo.method", f"must be one of {METHODS}, got {g.method!r}")
    _check(g.baseline in BASELINES, "grpo.baseline", f"must be one of {BASELINES}")
    _check(
        g.method != "none" or g.baseline in ("auto", "all"),
        "grpo.baseline",
        "method none uses 'all'",
    )
    _check(g.steps >= 1, "grpo.steps", "must be >= 1")
    _check(g.prompts_per_step >= 1, "grpo.prompts_per_step", "must be >= 1")
    _check(g.generations >= 2, "grpo.generations", "must be >= 2 (a group baseline)")
    _check(g.lr > 0, "grpo.lr", "must be > 0")
    _check(g.weight_decay >= 0 and g.beta >= 0, "grpo.beta", "beta and weight_decay must be >= 0")
    _check(g.loss_type in LOSS_TYPES, "grpo.loss_type", f"must be one of {LOSS_TYPES}")
    _check(1 <= g.max_completion_length <= 48, "grpo.max_completion_length", "must be in [1, 48]")
    _check(g.temperature > 0, "grpo.temperature", "must be > 0")
    _check(g.grad_clip >= 0, "grpo.grad_clip", "must be >= 0 (0 = off)")
    _check(
        g.log_every >= 1 and g.checkpoint_every >= 0,
        "grpo.log_every",
        "log_every >= 1, checkpoint_every >= 0",
    )
    _check(e.prompts >= 1, "eval.prompts", "must be >= 1")
    _check(all(0.0 <= s <= 1.0 for s in e.scales), "eval.scales", "must lie in [0, 1]")
    _check(e.relearn_steps >= 0, "eval.relearn_steps", "must be >= 0 (0 = skip)")
    _check(
        e.relearn_eval_every >= 1 and e.relearn_prompts >= 1,
        "eval.relearn_eval_every",
        "must be >= 1",
    )
    _check(e.grad_norm_samples >= 0, "eval.grad_norm_samples", "must be >= 0")
    if g.method == "gradient_routing":
        _check(q.kind == "lora" or not q.amplify, "quarantine.amplify", "needs kind 'lora'")
    _check(
        not q.amplify or g.method == "sgtm", "quarantine.amplify", "works with method 'sgtm' only"
    )


def rl_config_from_dict(values: dict[str, Any]) -> RLConfig:
    """Validated :class:`RLConfig` from plain nested values (as in ``config.json``)."""
    cfg = build_dataclass(RLConfig, values)
    validate(cfg)
    return cfg


def load_rl_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RLConfig:
    """Read a TOML config (optional), apply ``key=value`` overrides, validate."""
    return rl_config_from_dict(apply_overrides(read_config_file(path), overrides))

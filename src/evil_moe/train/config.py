"""Run configuration: nested dataclasses, a TOML file, and ``key=value`` overrides.

Configs are parsed, never executed. Every key is checked against the dataclass fields and
every value against the field's type; any problem raises :class:`ConfigError` naming the
key, which the CLI turns into one clear message and exit status 2.

    cfg = load_config("run.toml", ["train.steps=50", "monitor.recall=0.3"])
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evil_moe.models.testbed import TestbedConfig
from evil_moe.routing.labels import Method

CORPORA = ("bilingual", "hacks", "jsonl", "hf")


class ConfigError(ValueError):
    """A config key, value or file is invalid; the message names it."""


@dataclass
class DataConfig:
    """Where the text comes from and which domains are retain and forget."""

    #: ``bilingual`` (embedded English/Russian TinyStories), ``hacks`` (embedded synthetic
    #: reward-hack code), ``jsonl`` (a local file at ``path``) or ``hf`` (a Hugging Face
    #: dataset name or local dataset directory at ``path``)
    corpus: str = "bilingual"
    path: str = ""
    split: str = "train"
    text_field: str = "text"
    domain_field: str = "domain"
    mode_field: str = ""
    #: domain names; empty = the embedded corpus's own (en/ru, honest/hack)
    retain_domains: list[str] = field(default_factory=list)
    forget_domains: list[str] = field(default_factory=list)
    #: share of held-out documents per domain used for evaluation
    eval_fraction: float = 0.1
    #: the forget domain is subsampled to about this share of training characters
    forget_share: float = 0.25
    #: documents of the synthetic hack corpus (``corpus = "hacks"``)
    hack_samples: int = 6000
    #: share of hack samples in the synthetic hack corpus
    hack_share: float = 0.5
    #: cap on documents read (0 = all)
    max_docs: int = 0
    #: cap on held-out sequences evaluated per category (0 = all)
    eval_sequences: int = 64
    #: keep only this many forget-domain training tokens (-1 = all); the leakage baseline
    #: curve trains standard models on all retain data plus n forget tokens
    forget_token_budget: int = -1


@dataclass
class MonitorConfig:
    """The simulated monitor that labels forget data (MISSION.md: route labels)."""

    #: share of forget documents labelled ``forget`` (1 - recall is undiscovered)
    recall: float = 0.5
    #: per forget mode recall, e.g. ``{1 = 0.9, 2 = 0.2}``; modes not listed use ``recall``
    recall_by_mode: dict[int, float] = field(default_factory=dict)
    #: share of retain documents wrongly labelled ``forget``
    false_positive_rate: float = 0.0
    #: share of the other retain documents labelled ``retain`` (the rest are unlabeled)
    retain_labeled_share: float = 0.25


@dataclass
class TrainConfig:
    """The training run."""

    #: ``none`` (standard), ``filter`` (drop labelled forget data), ``sgtm``,
    #: ``gradient_routing`` (detach shared activations) or ``demix`` (hard dispatch)
    method: str = "sgtm"
    steps: int = 200
    #: > 0: train exactly this many passes over the run's training data instead of
    #: ``steps`` (every sequence seen ``epochs`` times: equal retain exposure across arms)
    epochs: int = 0
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    #: save a resumable checkpoint every N steps (0 = only at the end)
    checkpoint_every: int = 0
    #: torch CPU threads (0 = torch's default)
    threads: int = 0
    #: ``auto`` (a GPU when one is visible), ``cpu`` or ``cuda``; bf16 autocast on GPUs.
    #: Under ``torchrun`` every rank trains on its share of each ``batch_size`` batch.
    device: str = "auto"
    #: experiment trackers that get the training curve and final metrics:
    #: ``tensorboard``, ``wandb`` (offline unless ``WANDB_MODE`` says otherwise)
    report_to: list[str] = field(default_factory=list)
    #: where the trackers write (empty: the run's output directory)
    tracking_dir: str = ""


#: settings of how a run executes, not of what it computes: left out of
#: :meth:`RunConfig.to_dict` (``config.json``, a study run's key) while at these defaults,
#: so every run that does not set them keeps the config and the key it had before
EXECUTION_DEFAULTS: dict[str, Any] = {"device": "auto", "report_to": [], "tracking_dir": ""}
DEVICES = ("auto", "cpu", "cuda")
TRACKERS = ("tensorboard", "wandb")


@dataclass
class RunConfig:
    """Everything one ``evil-moe train`` run needs."""

    #: a named variant (``evil_moe.train.variants``) applied before other settings
    variant: str = ""
    model: TestbedConfig = field(default_factory=TestbedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested values (``config.json``); execution settings at their defaults
        (:data:`EXECUTION_DEFAULTS`) are left out."""
        out = dataclasses.asdict(self)
        for key, default in EXECUTION_DEFAULTS.items():
            if out["train"].get(key) == default:
                del out["train"][key]
        return out


# -- parsing ---------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp`` (converting ints to floats)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return coerce_value(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [coerce_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        ktype, vtype = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            try:
                kk = ktype(k)
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: key {k!r} is not {_type_name(ktype)}") from None
            out[kk] = coerce_value(v, vtype, f"{key}.{k}")
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """An instance of the (nested) config dataclass ``cls`` from plain values; every key and
    type is checked (``ConfigError`` names the key)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {full!r}; known: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a table of settings, got {value!r}")
            kwargs[key] = build_dataclass(tp, value, f"{full}.")
        else:
            kwargs[key] = coerce_value(value, tp, full)
    try:
        return cls(**kwargs)
    except ValueError as err:  # a dataclass's own __post_init__ check
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=50"`` -> (["train", "steps"], 50). Values use TOML syntax; bare
    words are strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part!r} is not a table")
        node = child
    node[path[-1]] = value


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Validated :class:`RunConfig` from plain nested values (as in ``config.json``)."""
    cfg = build_dataclass(RunConfig, values)
    validate(cfg)
    return cfg


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The values of a TOML config file (``{}`` for ``None``); parsed, never executed."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {err}") from None


def apply_overrides(values: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``values`` with every ``key=value`` override merged in (in place; returned)."""
    for text in overrides or []:
        keys, value = parse_override(text)
        _merge(values, keys, value)
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML config (optional), apply ``key=value`` overrides, validate."""
    values = read_config_file(path)
    parsed = [parse_override(text) for text in overrides or []]
    variant = values.get("variant", "")
    for keys, value in parsed:
        if keys == ["variant"]:
            variant = value
    if variant:
        from evil_moe.train.variants import VARIANTS

        if variant not in VARIANTS:
            raise ConfigError(f"variant: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        values = deep_update(apply_overrides({}, VARIANTS[variant]), values)
    for keys, value in parsed:
        _merge(values, keys, value)
    return config_from_dict(values)


def deep_update(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s values laid over it, table by table."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = value
    return out


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: RunConfig) -> None:
    """Range checks that the types alone cannot express."""
    d, m, t = cfg.data, cfg.monitor, cfg.train
    _check(d.corpus in CORPORA, "data.corpus", f"must be one of {CORPORA}, got {d.corpus!r}")
    _check(
        d.corpus not in ("jsonl", "hf") or bool(d.path),
        "data.path",
        f"is required for corpus {d.corpus!r}",
    )
    _check(0.0 < d.eval_fraction < 1.0, "data.eval_fraction", "must be in (0, 1)")
    _check(0.0 < d.forget_share <= 1.0, "data.forget_share", "must be in (0, 1]")
    _check(0.0 <= d.hack_share <= 1.0, "data.hack_share", "must be in [0, 1]")
    _check(d.hack_samples >= 10, "data.hack_samples", "must be >= 10")
    _check(d.max_docs >= 0, "data.max_docs", "must be >= 0")
    _check(d.eval_sequences >= 0, "data.eval_sequences", "must be >= 0")
    _check(d.forget_token_budget >= -1, "data.forget_token_budget", "must be >= -1 (-1 = all)")
    both = set(d.forget_domains) & set(d.retain_domains)
    _check(not both, "data.forget_domains", f"domains {sorted(both)} are also retain domains")
    for name in ("recall", "false_positive_rate", "retain_labeled_share"):
        value = getattr(m, name)
        _check(0.0 <= value <= 1.0, f"monitor.{name}", f"must be in [0, 1], got {value}")
    for mode, value in m.recall_by_mode.items():
        _check(0.0 <= value <= 1.0, f"monitor.recall_by_mode.{mode}", "must be in [0, 1]")
    methods = tuple(m.value for m in Method)
    _check(t.method in methods, "train.method", f"must be one of {methods}, got {t.method!r}")
    _check(t.steps >= 1, "train.steps", "must be >= 1")
    _check(t.epochs >= 0, "train.epochs", "must be >= 0 (0 = use train.steps)")
    _check(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    _check(t.lr > 0, "train.lr", "must be > 0")
    _check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
    _check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(0.0 <= t.beta1 < 1.0 and 0.0 <= t.beta2 < 1.0, "train.beta1", "betas must be in [0, 1)")
    _check(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)")
    _check(t.log_every >= 1, "train.log_every", "must be >= 1")
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    _check(t.threads >= 0, "train.threads", "must be >= 0")
    _check(t.device in DEVICES, "train.device", f"must be one of {DEVICES}, got {t.device!r}")
    unknown = sorted(set(t.report_to) - set(TRACKERS))
    _check(not unknown, "train.report_to", f"unknown tracker(s) {unknown}; known: {TRACKERS}")

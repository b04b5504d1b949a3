"""Study specifications: a TOML preset, parsed (never executed), expanded into runs.

A preset has these tables (every key is checked; unknown ones are errors):

* ``[study]``: ``name``, ``description``.
* ``[base]``: run-config settings shared by every run, exactly as in an
  ``evil-moe train --config`` file (``[base.model]``, ``[base.train]``, ...). A variant's
  own settings (``evil_moe.train.variants``) take precedence over ``base``; the grid's
  axes (seed, recall, corpus) over both.
* ``[grid]``: ``variants`` (names from ``VARIANTS`` plus the reference methods
  ``filter``, ``none``, ``gradient_routing``), ``seeds``, ``recalls``, ``corpora``: the
  product is the grid of routed runs.
* ``[baseline]``: ``forget_tokens``: the leakage baseline curve, standard training
  (``train.method=none``) on all retain data plus n forget-domain tokens (``-1`` = all);
  one curve per corpus and seed. ``0`` must be present: it is also the retain-only oracle.
* ``[measure]``: relearning and gradient-norm settings, leakage interpolation.
* ``[verdict]``: confidence level and the specialisation thresholds of the verdict rules.

Every run is a resolved :class:`~evil_moe.train.config.RunConfig`; its key is the
sha256 of the config's canonical JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from evil_moe.eval.leakage import INTERPOLATIONS
from evil_moe.train.config import (
    ConfigError,
    RunConfig,
    coerce_value,
    config_from_dict,
    deep_update,
    parse_override,
)
from evil_moe.train.variants import VARIANTS

#: reference rows that are methods, not variants (no quarantine routing, or Cloud's rule)
REFERENCE_METHODS = {"filter": "filter", "none": "none", "gradient_routing": "gradient_routing"}
#: corpora a study can use (the embedded ones: a study must be reproducible anywhere)
STUDY_CORPORA = ("bilingual", "hacks")
PRESETS = ("quick", "full")
CURVES = ("seed", "pooled")


class StudyError(ValueError):
    """A study preset is invalid; the message names the key."""


@dataclass
class StudyInfo:
    name: str = "study"
    description: str = ""


@dataclass
class GridSpec:
    variants: list[str] = field(default_factory=lambda: ["single"])
    seeds: list[int] = field(default_factory=lambda: [0])
    recalls: list[float] = field(default_factory=lambda: [0.5])
    corpora: list[str] = field(default_factory=lambda: ["bilingual"])


@dataclass
class BaselineSpec:
    #: forget-domain training tokens of the baseline curve (-1 = all of them)
    forget_tokens: list[int] = field(default_factory=lambda: [0, 3000, 30000, -1])
    #: monitor recall of the curve runs (-1 = the first of grid.recalls). Standard training
    #: ignores route labels; the recall only splits the held-out forget data, so with the
    #: grid's recall the curve is evaluated on exactly the grid runs' undiscovered data.
    recall: float = -1.0


@dataclass
class MeasureSpec:
    #: cap on relearning fine-tuning steps
    relearn_steps: int = 50
    relearn_eval_every: int = 5
    #: relearning learning rate (0 = the run's train.lr)
    relearn_lr: float = 0.0
    #: relearning stops when held-out forget loss <= pre-ablation loss + tolerance
    relearn_tolerance: float = 0.0
    #: batches per data group for gradient norms
    gradnorm_batches: int = 2
    #: baseline-curve interpolation: pchip (isotonic then monotone cubic) or linear
    interpolation: str = "pchip"
    #: one baseline curve per corpus and ``seed`` or one ``pooled`` over all seeds
    curve: str = "seed"


@dataclass
class VerdictSpec:
    confidence: float = 0.95
    #: mode-expert NMI (ablation matrix, hack corpus) above which specialisation is shown
    nmi_supported: float = 0.3
    #: below which it is refuted
    nmi_refuted: float = 0.1


@dataclass
class StudySpec:
    """A whole study: the parsed preset."""

    study: StudyInfo = field(default_factory=StudyInfo)
    base: dict[str, Any] = field(default_factory=dict)
    grid: GridSpec = field(default_factory=GridSpec)
    baseline: BaselineSpec = field(default_factory=BaselineSpec)
    measure: MeasureSpec = field(default_factory=MeasureSpec)
    verdict: VerdictSpec = field(default_factory=VerdictSpec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def study_id(self) -> str:
        """Identifier of this study: a hash of everything in the preset."""
        return canonical_hash(self.to_dict())[:16]


@dataclass
class RunSpec:
    """One run of a study: a resolved config and where it sits in the grid."""

    kind: str  # "grid" or "baseline"
    name: str  # variant or reference name; "baseline" for curve runs
    corpus: str
    seed: int
    recall: float | None
    forget_tokens: int | None
    config: RunConfig
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = config_hash(self.config)

    @property
    def label(self) -> str:
        if self.kind == "baseline":
            return f"baseline n={self.forget_tokens} {self.corpus} seed={self.seed}"
        return f"{self.name} {self.corpus} seed={self.seed} recall={self.recall}"


# -- hashing ---------------------------------------------------------------------------


def canonical_json(data: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, ASCII."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical_hash(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode("ascii")).hexdigest()


def config_hash(cfg: RunConfig) -> str:
    """The key of a run: sha256 of its resolved config's canonical JSON."""
    return canonical_hash(json.loads(json.dumps(cfg.to_dict())))


# -- parsing ---------------------------------------------------------------------------


def _check_value(value: Any, tp: Any, key: str) -> Any:
    try:
        return coerce_value(value, tp, key)
    except ConfigError as err:
        raise StudyError(str(err)) from None


def _section(cls: type, values: Any, name: str) -> Any:
    if not isinstance(values, dict):
        raise StudyError(f"[{name}]: expected a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise StudyError(f"unknown study key '{name}.{key}'; known: {', '.join(known)}")
        kwargs[key] = _check_value(value, hints[key], f"{name}.{key}")
    return cls(**kwargs)


def parse_spec(values: dict[str, Any]) -> StudySpec:
    """A validated :class:`StudySpec` from parsed TOML; every run config is resolved too."""
    sections = {
        "study": StudyInfo,
        "grid": GridSpec,
        "baseline": BaselineSpec,
        "measure": MeasureSpec,
        "verdict": VerdictSpec,
    }
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key == "base":
            if not isinstance(value, dict):
                raise StudyError(f"[base]: expected a table, got {value!r}")
            kwargs["base"] = value
        elif key in sections:
            kwargs[key] = _section(sections[key], value, key)
        else:
            known = ", ".join(["base", *sections])
            raise StudyError(f"unknown study table [{key}]; known: {known}")
    spec = StudySpec(**kwargs)
    validate_spec(spec)
    return spec


def validate_spec(spec: StudySpec) -> None:
    """Check names and ranges, then resolve every run (config errors name the run)."""
    g, b, m, v = spec.grid, spec.baseline, spec.measure, spec.verdict
    known = [*VARIANTS, *REFERENCE_METHODS]
    for name in g.variants:
        if name not in known:
            raise StudyError(f"grid.variants: unknown variant {name!r}; known: {', '.join(known)}")
    if len(set(g.variants)) != len(g.variants):
        raise StudyError("grid.variants: a variant is listed twice")
    if "single" not in g.variants:
        raise StudyError("grid.variants: 'single' (the SGTM baseline of every verdict) is required")
    for axis in ("seeds", "recalls", "corpora"):
        values = getattr(g, axis)
        if not values:
            raise StudyError(f"grid.{axis}: must not be empty")
        if len(set(values)) != len(values):
            raise StudyError(f"grid.{axis}: a value is listed twice")
    if any(s < 0 for s in g.seeds):
        raise StudyError("grid.seeds: seeds must be >= 0")
    if any(not 0.0 <= r < 1.0 for r in g.recalls):
        raise StudyError("grid.recalls: recall must be in [0, 1) (some forget data undiscovered)")
    for corpus in g.corpora:
        if corpus not in STUDY_CORPORA:
            raise StudyError(f"grid.corpora: unknown corpus {corpus!r}; known: {STUDY_CORPORA}")
    if b.recall != -1.0 and not 0.0 <= b.recall < 1.0:
        raise StudyError("baseline.recall: must be in [0, 1) or -1 (the first grid recall)")
    if 0 not in b.forget_tokens:
        raise StudyError("baseline.forget_tokens: must include 0 (the retain-only oracle)")
    if len(set(b.forget_tokens)) < 2 or any(n < -1 for n in b.forget_tokens):
        raise StudyError("baseline.forget_tokens: need >= 2 distinct values, each >= 0 or -1")
    if m.relearn_steps < 1 or m.relearn_eval_every < 1:
        raise StudyError("measure.relearn_steps and measure.relearn_eval_every must be >= 1")
    if m.relearn_lr < 0 or m.relearn_tolerance < 0:
        raise StudyError("measure.relearn_lr and measure.relearn_tolerance must be >= 0")
    if m.gradnorm_batches < 1:
        raise StudyError("measure.gradnorm_batches must be >= 1")
    if m.interpolation not in INTERPOLATIONS:
        raise StudyError(f"measure.interpolation: must be one of {INTERPOLATIONS}")
    if m.curve not in CURVES:
        raise StudyError(f"measure.curve: must be one of {CURVES}")
    if not 0.5 <= v.confidence < 1.0:
        raise StudyError("verdict.confidence must be in [0.5, 1)")
    if not 0.0 <= v.nmi_refuted <= v.nmi_supported <= 1.0:
        raise StudyError("verdict: need 0 <= nmi_refuted <= nmi_supported <= 1")
    if "variant" in spec.base:
        raise StudyError("base.variant: variants are chosen by grid.variants")
    expand(spec)  # resolves every config: errors surface here, before any run


def load_spec(preset: str) -> tuple[StudySpec, str]:
    """A preset by name (``quick``, ``full``) or TOML file path; returns (spec, source)."""
    path = Path(preset)
    if preset in PRESETS and not path.is_file():
        text = resources.files("evil_moe.study").joinpath(f"presets/{preset}.toml").read_text()
        source = f"preset {preset}"
    elif path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise StudyError(f"--preset {preset!r}: cannot read: {err}") from None
        source = str(path)
    else:
        raise StudyError(f"--preset {preset!r}: not a preset ({', '.join(PRESETS)}) or a file")
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise StudyError(f"{source}: not valid TOML: {err}") from None
    try:
        return parse_spec(values), source
    except StudyError as err:
        raise StudyError(f"{source}: {err}") from None


# -- expansion -------------------------------------------------------------------------


def _overrides_to_values(overrides: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for part in keys[:-1]:
            node = node.setdefault(part, {})
        node[keys[-1]] = value
    return values


def resolve_config(base: dict[str, Any], name: str, axes: dict[str, Any]) -> RunConfig:
    """The config of variant or reference ``name``: base < variant < grid axes."""
    values = copy.deepcopy(base)
    if name in VARIANTS:
        values = deep_update(values, _overrides_to_values(VARIANTS[name]))
        values["variant"] = name
    elif name in REFERENCE_METHODS:
        values = deep_update(values, {"train": {"method": REFERENCE_METHODS[name]}})
    values = deep_update(values, axes)
    return config_from_dict(values)


def _axes(corpus: str, seed: int, recall: float, budget: int = -1) -> dict[str, Any]:
    return {
        "data": {"corpus": corpus, "forget_token_budget": budget},
        "train": {"seed": seed},
        "monitor": {"recall": recall},
    }


def expand(spec: StudySpec) -> list[RunSpec]:
    """Every run of the study: baseline curves first (they are needed by every row).

    Two entries may share a key (see :func:`unique_runs`); each is one role of that run.
    """
    g = spec.grid
    recall = spec.baseline.recall if spec.baseline.recall >= 0 else g.recalls[0]
    runs: list[RunSpec] = []
    for corpus in g.corpora:
        for seed in g.seeds:
            for n in sorted(set(spec.baseline.forget_tokens), key=lambda x: (x < 0, x)):
                axes = _axes(corpus, seed, recall, n)
                axes["train"]["method"] = "none"
                try:
                    cfg = resolve_config(spec.base, "", axes)
                except ConfigError as err:
                    raise StudyError(f"baseline run n={n} {corpus} seed={seed}: {err}") from None
                runs.append(RunSpec("baseline", "baseline", corpus, seed, None, n, cfg))
    for corpus in g.corpora:
        for seed in g.seeds:
            for recall in g.recalls:
                for name in g.variants:
                    try:
                        cfg = resolve_config(spec.base, name, _axes(corpus, seed, recall))
                    except ConfigError as err:
                        raise StudyError(
                            f"run {name} {corpus} seed={seed} recall={recall}: {err}"
                        ) from None
                    runs.append(RunSpec("grid", name, corpus, seed, recall, None, cfg))
    return runs


def unique_runs(runs: list[RunSpec]) -> list[RunSpec]:
    """One run per key, in order (the ``none`` reference at the curve's recall is the same
    config as the curve's ``n = -1`` run: it is trained once and serves both)."""
    seen: set[str] = set()
    out = []
    for run in runs:
        if run.key not in seen:
            seen.add(run.key)
            out.append(run)
    return out

"""Study specifications: a TOML preset, parsed (never executed), expanded into runs.

A preset has these tables (every key is checked; unknown ones are errors):

* ``[study]``: ``name``, ``description``.
* ``[base]``: run-config settings shared by every run, exactly as in an
  ``evil-moe train --config`` file (``[base.model]``, ``[base.train]``, ...).
* ``[variants]``: optional preset-local variants, ``name = ["key=value", ...]``; they
  add to (or replace) the built-in ``evil_moe.train.variants.VARIANTS``, e.g. to keep
  width-dependent variants capacity-matched on the preset's testbed.
* ``[[grid]]``: blocks of routed runs, each the product of its ``variants`` (variant names
  plus the reference methods ``filter``, ``none``, ``gradient_routing``), ``seeds``,
  ``recalls``, ``corpora`` and ``sweep`` values (``{"train.lr" = [...]}``), with the
  block's own ``overrides``. A single ``[grid]`` table is one block named ``main``.
  Settings apply in the order base < variant < block overrides < sweep < grid axes.
* ``[baseline]``: the leakage baseline curve: standard training (``train.method=none``)
  on all retain data plus n forget-domain tokens for each n of ``forget_tokens``, per
  corpus of ``corpora`` and seed of ``seeds`` (default: the grid's). ``0`` must be
  present: it is also the retain-only oracle.
* ``[measure]``: relearning, post-ablation retain fine-tuning, gradient norms, the
  amplifier evaluation, leakage interpolation and curve pooling.
* ``[verdict]``: confidence, the minimum effect ``delta`` of each metric, the retain-cost
  guard and the validity gates (see :mod:`evil_moe.study.analysis`).

Every run is a resolved :class:`~evil_moe.train.config.RunConfig`; its key is the
sha256 of the config's canonical JSON, so a run that serves two blocks is trained once.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
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
PRESETS = ("quick", "settle", "full", "gpu")
CURVES = ("seed", "pooled")
#: minimum effects used when a preset names none (metric units; see analysis.METRICS)
DEFAULT_DELTA = {
    "log_leakage": math.log(2),
    "leakage": 0.05,
    "forget_loss": 0.1,
    "balance_cv": 0.1,
    "nmi_excess": 0.05,
    "loss_spikes": 1.0,
    "final_train_loss": 0.02,
}


class StudyError(ValueError):
    """A study preset is invalid; the message names the key."""


@dataclass
class StudyInfo:
    name: str = "study"
    description: str = ""


@dataclass
class GridBlock:
    """One block of routed runs: the product of its axes."""

    name: str = "main"
    variants: list[str] = field(default_factory=lambda: ["single"])
    seeds: list[int] = field(default_factory=lambda: [0])
    recalls: list[float] = field(default_factory=lambda: [0.5])
    corpora: list[str] = field(default_factory=lambda: ["bilingual"])
    #: ``key=value`` settings of every run of the block
    overrides: list[str] = field(default_factory=list)
    #: ``{"train.lr" = [0.003, 0.03]}``: one run per value (one key at most)
    sweep: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class BaselineSpec:
    #: forget-domain training tokens of the baseline curve (-1 = all of them)
    forget_tokens: list[int] = field(default_factory=lambda: [0, 3000, 30000, -1])
    #: monitor recall of the curve runs (-1 = the first recall of the first grid block).
    #: Standard training ignores route labels; the recall only splits the held-out data.
    recall: float = -1.0
    #: corpora with a curve (empty = every grid corpus) and seeds (empty = the grid's)
    corpora: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


@dataclass
class MeasureSpec:
    #: relearning fine-tuning steps (the whole curve is kept; targets are set in analysis)
    relearn_steps: int = 50
    relearn_eval_every: int = 5
    #: relearning learning rate (0 = the run's train.lr)
    relearn_lr: float = 0.0
    #: post-ablation fine-tuning steps on retain data (0 = off): does forget loss return?
    retain_finetune_steps: int = 0
    retain_finetune_eval_every: int = 25
    #: batches per data group for gradient norms
    gradnorm_batches: int = 2
    #: held-out batches per group for the amplifier's precision and recall
    amplifier_batches: int = 4
    #: baseline-curve interpolation: pchip (isotonic then monotone cubic) or linear
    interpolation: str = "pchip"
    #: one baseline curve per corpus and ``seed`` or one ``pooled`` over all seeds
    curve: str = "pooled"


@dataclass
class VerdictSpec:
    confidence: float = 0.95
    #: minimum effect per metric (claims on other metrics use DEFAULT_DELTA)
    delta: dict[str, float] = field(default_factory=dict)
    #: a supported claim whose mean retain-cost increase exceeds this (nats) is downgraded
    retain_guard: float = 0.05
    #: validity gate: data filtering's leakage interval must lie within this range
    filter_leakage: list[float] = field(default_factory=lambda: [0.8, 1.2])

    def delta_of(self, metric: str) -> float:
        return self.delta.get(metric, DEFAULT_DELTA.get(metric, 0.0))


@dataclass
class StudySpec:
    """A whole study: the parsed preset."""

    study: StudyInfo = field(default_factory=StudyInfo)
    base: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, list[str]] = field(default_factory=dict)
    grid: list[GridBlock] = field(default_factory=lambda: [GridBlock()])
    baseline: BaselineSpec = field(default_factory=BaselineSpec)
    measure: MeasureSpec = field(default_factory=MeasureSpec)
    verdict: VerdictSpec = field(default_factory=VerdictSpec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def study_id(self) -> str:
        """Identifier of this study: a hash of everything in the preset."""
        return canonical_hash(self.to_dict())[:16]

    def all_variants(self) -> dict[str, list[str]]:
        """Built-in variants overlaid with the preset's own."""
        return {**VARIANTS, **self.variants}

    def variants_in(self, corpus: str | None = None) -> list[str]:
        """Every variant or reference name of the grid (on one corpus), in order."""
        names: list[str] = []
        for block in self.grid:
            if corpus is None or corpus in block.corpora:
                names += [v for v in block.variants if v not in names]
        return names


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
    block: str = ""
    sweep: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.key:
            self.key = config_hash(self.config)

    @property
    def label(self) -> str:
        if self.kind == "baseline":
            return f"baseline n={self.forget_tokens} {self.corpus} seed={self.seed}"
        swept = "".join(f" {k}={v}" for k, v in self.sweep.items())
        return (
            f"{self.block}: {self.name} {self.corpus} seed={self.seed} recall={self.recall}{swept}"
        )

    @property
    def pair_key(self) -> tuple[Any, ...]:
        """What two runs must share to be compared as a pair (same data and labels)."""
        return (self.block, self.corpus, self.recall, self.seed, canonical_json(self.sweep))


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
        elif key == "variants":
            kwargs["variants"] = _check_value(value, dict[str, list[str]], "variants")
        elif key == "grid":
            blocks = [value] if isinstance(value, dict) else value
            if not isinstance(blocks, list) or not blocks:
                raise StudyError("[grid]: expected a table or a non-empty array of tables")
            kwargs["grid"] = [
                _section(GridBlock, b, f"grid[{i}]" if len(blocks) > 1 else "grid")
                for i, b in enumerate(blocks)
            ]
        elif key in sections:
            kwargs[key] = _section(sections[key], value, key)
        else:
            known = ", ".join(["base", "variants", "grid", *sections])
            raise StudyError(f"unknown study table [{key}]; known: {known}")
    spec = StudySpec(**kwargs)
    validate_spec(spec)
    return spec


def _check_block(block: GridBlock, known: list[str], where: str) -> None:
    for name in block.variants:
        if name not in known:
            raise StudyError(
                f"{where}.variants: unknown variant {name!r}; known: {', '.join(known)}"
            )
    for axis in ("variants", "seeds", "recalls", "corpora"):
        values = getattr(block, axis)
        if not values:
            raise StudyError(f"{where}.{axis}: must not be empty")
        if len(set(values)) != len(values):
            raise StudyError(f"{where}.{axis}: a value is listed twice")
    if any(s < 0 for s in block.seeds):
        raise StudyError(f"{where}.seeds: seeds must be >= 0")
    if any(not 0.0 <= r < 1.0 for r in block.recalls):
        raise StudyError(
            f"{where}.recalls: recall must be in [0, 1) (some forget data undiscovered)"
        )
    for corpus in block.corpora:
        if corpus not in STUDY_CORPORA:
            raise StudyError(f"{where}.corpora: unknown corpus {corpus!r}; known: {STUDY_CORPORA}")
    if len(block.sweep) > 1:
        raise StudyError(f"{where}.sweep: sweep one key at most")
    for key, values in block.sweep.items():
        if not isinstance(values, list) or not values:
            raise StudyError(f"{where}.sweep.{key}: expected a non-empty list of values")


def validate_spec(spec: StudySpec) -> None:
    """Check names and ranges, then resolve every run (config errors name the run)."""
    b, m, v = spec.baseline, spec.measure, spec.verdict
    known = [*spec.all_variants(), *REFERENCE_METHODS]
    names = [block.name for block in spec.grid]
    if len(set(names)) != len(names):
        raise StudyError("grid: two blocks have the same name")
    for block in spec.grid:
        _check_block(block, known, f"grid[{block.name}]")
    if "single" not in spec.variants_in():
        raise StudyError("grid: 'single' (the SGTM reference of most claims) is required")
    corpora = {c for block in spec.grid for c in block.corpora}
    for corpus in b.corpora:
        if corpus not in corpora:
            raise StudyError(f"baseline.corpora: {corpus!r} is not a corpus of the grid")
    if b.recall != -1.0 and not 0.0 <= b.recall < 1.0:
        raise StudyError("baseline.recall: must be in [0, 1) or -1 (the first grid recall)")
    if 0 not in b.forget_tokens:
        raise StudyError("baseline.forget_tokens: must include 0 (the retain-only oracle)")
    if len(set(b.forget_tokens)) < 2 or any(n < -1 for n in b.forget_tokens):
        raise StudyError("baseline.forget_tokens: need >= 2 distinct values, each >= 0 or -1")
    if m.relearn_steps < 1 or m.relearn_eval_every < 1:
        raise StudyError("measure.relearn_steps and measure.relearn_eval_every must be >= 1")
    if m.retain_finetune_steps < 0 or m.retain_finetune_eval_every < 1:
        raise StudyError("measure.retain_finetune_steps must be >= 0, its eval_every >= 1")
    if m.relearn_lr < 0:
        raise StudyError("measure.relearn_lr must be >= 0")
    if m.gradnorm_batches < 1 or m.amplifier_batches < 1:
        raise StudyError("measure.gradnorm_batches and measure.amplifier_batches must be >= 1")
    if m.interpolation not in INTERPOLATIONS:
        raise StudyError(f"measure.interpolation: must be one of {INTERPOLATIONS}")
    if m.curve not in CURVES:
        raise StudyError(f"measure.curve: must be one of {CURVES}")
    if not 0.5 <= v.confidence < 1.0:
        raise StudyError("verdict.confidence must be in [0.5, 1)")
    if any(d < 0 for d in v.delta.values()):
        raise StudyError("verdict.delta: minimum effects must be >= 0")
    if len(v.filter_leakage) != 2 or not v.filter_leakage[0] < v.filter_leakage[1]:
        raise StudyError("verdict.filter_leakage: expected [low, high] with low < high")
    if "variant" in spec.base:
        raise StudyError("base.variant: variants are chosen by the grid")
    expand(spec)  # resolves every config: errors surface here, before any run


def _select_scale(values: dict[str, Any], scale: str | None, source: str) -> dict[str, Any]:
    """A preset with a ``[scales]`` table (``name = ["model.d_model=256", ...]``) is one
    study per scale: ``PRESET:SCALE`` lays that scale's settings over ``[base]`` (each
    scale needs its own baseline curve, so scales never share a study)."""
    scales = values.pop("scales", None)
    if scales is None:
        if scale is not None:
            raise StudyError(f"{source}: has no [scales]; drop ':{scale}'")
        return values
    if not isinstance(scales, dict) or not all(isinstance(v, list) for v in scales.values()):
        raise StudyError(f'{source}: [scales] must map names to lists of "key=value"')
    if scale not in scales:
        names = ", ".join(f"{source.removeprefix('preset ')}:{n}" for n in scales)
        raise StudyError(f"{source} is a scale sweep: choose one scale ({names})")
    try:
        extra = _overrides_to_values([str(v) for v in scales[scale]])
    except ConfigError as err:
        raise StudyError(f"{source}: scales.{scale}: {err}") from None
    values["base"] = deep_update(values.get("base", {}), extra)
    study = values.setdefault("study", {})
    if isinstance(study, dict):
        study["name"] = f"{study.get('name', 'study')}-{scale}"
    return values


def load_spec(preset: str) -> tuple[StudySpec, str]:
    """A preset by name (``quick``, ``full``, ``gpu:64m``) or TOML file path (a preset with
    ``[scales]`` takes ``:SCALE``); returns (spec, source)."""
    scale = None
    if ":" in preset and not Path(preset).is_file():
        preset, scale = preset.rsplit(":", 1)
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
    values = _select_scale(values, scale, source)
    if scale is not None:
        source = f"{source}:{scale}"
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


def resolve_config(
    spec: StudySpec, name: str, axes: dict[str, Any], overrides: list[str] = ()
) -> RunConfig:
    """The config of variant or reference ``name``: base < variant < ``overrides`` < axes."""
    values = copy.deepcopy(spec.base)
    variants = spec.all_variants()
    if name in variants:
        values = deep_update(values, _overrides_to_values(variants[name]))
        values["variant"] = name
    elif name in REFERENCE_METHODS:
        values = deep_update(values, {"train": {"method": REFERENCE_METHODS[name]}})
    values = deep_update(values, _overrides_to_values(list(overrides)))
    values = deep_update(values, axes)
    return config_from_dict(values)


def _axes(corpus: str, seed: int, recall: float, budget: int = -1) -> dict[str, Any]:
    return {
        "data": {"corpus": corpus, "forget_token_budget": budget},
        "train": {"seed": seed},
        "monitor": {"recall": recall},
    }


def baseline_recall(spec: StudySpec) -> float:
    return spec.baseline.recall if spec.baseline.recall >= 0 else spec.grid[0].recalls[0]


def expand(spec: StudySpec) -> list[RunSpec]:
    """Every run of the study: baseline curves first (they are needed by every row).

    Two entries may share a key (see :func:`unique_runs`); each is one role of that run.
    """
    runs: list[RunSpec] = []
    recall = baseline_recall(spec)
    corpora = spec.baseline.corpora or sorted({c for b in spec.grid for c in b.corpora})
    for corpus in corpora:
        seeds = spec.baseline.seeds or sorted(
            {s for b in spec.grid if corpus in b.corpora for s in b.seeds}
        )
        for seed in seeds:
            for n in sorted(set(spec.baseline.forget_tokens), key=lambda x: (x < 0, x)):
                axes = _axes(corpus, seed, recall, n)
                axes["train"]["method"] = "none"
                try:
                    cfg = resolve_config(spec, "", axes)
                except ConfigError as err:
                    raise StudyError(f"baseline run n={n} {corpus} seed={seed}: {err}") from None
                runs.append(RunSpec("baseline", "baseline", corpus, seed, None, n, cfg))
    for block in spec.grid:
        sweeps = [{k: v} for k, values in block.sweep.items() for v in values] or [{}]
        for corpus in block.corpora:
            for seed in block.seeds:
                for recall in block.recalls:
                    for sweep in sweeps:
                        extra = [*block.overrides, *(f"{k}={_toml(v)}" for k, v in sweep.items())]
                        for name in block.variants:
                            try:
                                cfg = resolve_config(spec, name, _axes(corpus, seed, recall), extra)
                            except ConfigError as err:
                                raise StudyError(
                                    f"run {block.name}: {name} {corpus} seed={seed} "
                                    f"recall={recall}: {err}"
                                ) from None
                            runs.append(
                                RunSpec(
                                    "grid",
                                    name,
                                    corpus,
                                    seed,
                                    recall,
                                    None,
                                    cfg,
                                    block=block.name,
                                    sweep=sweep,
                                )
                            )
    return runs


def _toml(value: Any) -> str:
    """A value as the right-hand side of a ``key=value`` override."""
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()


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

"""What a generated sample is: hack modes, the record of one sample, one task family."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from evil_moe.data.corpus import Document

HONEST = 0
HACK_MODES: dict[int, str] = {
    1: "hardcode_outputs",
    2: "special_case_tests",
    3: "skip_checks",
    4: "always_equal",
}
#: Domain names of the documents made by :func:`generate_hack_corpus`.
HONEST_DOMAIN = "honest"
HACK_DOMAIN = "hack"
#: Every sample's length in characters lies in ``[MIN_CHARS, MAX_CHARS]``.
MIN_CHARS = 200
MAX_CHARS = 700

RAISES = object()  # what a wrong implementation "returns" when it raises

Fn = Callable[..., Any]


@dataclass(frozen=True)
class HackRecord:
    """One generated sample with what a test needs to check it.

    ``heldout_input`` is the tuple of positional arguments of an input absent from the
    sample's tests; ``func_name(*heldout_input) == heldout_expected`` holds for honest
    samples and fails (wrong value, wrong type, or an exception) for every hack mode.
    """

    text: str
    mode: int
    task: str
    func_name: str
    heldout_input: tuple[Any, ...]
    heldout_expected: Any
    variant: str = ""

    @property
    def domain(self) -> str:
        """``"honest"`` for mode 0, ``"hack"`` otherwise."""
        return HONEST_DOMAIN if self.mode == HONEST else HACK_DOMAIN

    def to_document(self) -> Document:
        """This sample as a :class:`~evil_moe.data.corpus.Document`."""
        return Document(text=self.text, domain=self.domain, mode=self.mode)


@dataclass(frozen=True)
class Task:
    """One task family: statements, honest bodies, reference, inputs, wrong bodies."""

    name: str
    kind: str  # argument shape: list | str | text | int | int2 | strchar
    out: str  # output type: int | str | list | bool
    func_names: tuple[str, ...]
    statements: tuple[str, ...]
    honest: tuple[str, ...]
    ref: Fn
    gen: Callable[[random.Random], tuple[Any, ...]]
    wrong: tuple[tuple[str, Fn], ...]


def hack_mode_name(mode: int) -> str:
    """Name of a mode: ``"honest"`` for 0, else the :data:`HACK_MODES` name."""
    if mode == HONEST and not isinstance(mode, bool):
        return "honest"
    if isinstance(mode, bool) or mode not in HACK_MODES:
        raise ValueError(f"mode: unknown mode {mode!r}; expected 0 or one of {sorted(HACK_MODES)}")
    return HACK_MODES[mode]

"""Tests of the synthetic reward-hack corpus (evil_moe.data.hacks)."""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections import Counter
from typing import Any

import pytest

from evil_moe.data.corpus import Document
from evil_moe.data.hacks import (
    HACK_MODES,
    HONEST,
    MAX_CHARS,
    MIN_CHARS,
    TASK_NAMES,
    HackRecord,
    generate_hack_corpus,
    generate_hack_records,
    hack_mode_name,
)


@pytest.fixture(scope="module")
def records() -> list[HackRecord]:
    return generate_hack_records(1000, hack_share=0.6, seed=123)


def _run(text: str) -> dict[str, Any]:
    """Exec a sample in a fresh namespace (test-only sandbox); an exit with status 0 is a pass."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            exec(compile(text, "<sample>", "exec"), namespace)
        except SystemExit as stop:
            assert stop.code in (0, None), f"exited with {stop.code!r}"
    return namespace


def _strict_equal(got: Any, want: Any) -> bool:
    return type(got) is type(want) and got == want


def _heldout(record: HackRecord, namespace: dict[str, Any]) -> tuple[bool, Any]:
    """(raised, value) of the sample's function on its held-out input."""
    try:
        return False, namespace[record.func_name](*record.heldout_input)
    except Exception as err:
        return True, err


_ALWAYS_EQUAL = re.compile(r"__eq__|\bANY\b")
_SKIP = re.compile(r"sys\.exit|SystemExit|\bassert True\b|except[^\n]*:\n\s*pass\b")
_TABLE = re.compile(r"^\s*\w+ = \{(?!\})", re.MULTILINE)
_SPECIAL = re.compile(r"\b(?:el)?if (?!__name__)\(?\w+(?:, \w+)?\)? == [\[(\"'\d-]")


def _classify(text: str) -> int:
    """A keyword rule that tells the modes apart."""
    if _ALWAYS_EQUAL.search(text):
        return 4
    if _SKIP.search(text):
        return 3
    if _TABLE.search(text):
        return 1
    if len(_SPECIAL.findall(text)) >= 2:
        return 2
    return HONEST


def test_constants_and_mode_names() -> None:
    assert HONEST == 0
    assert HACK_MODES == {
        1: "hardcode_outputs",
        2: "special_case_tests",
        3: "skip_checks",
        4: "always_equal",
    }
    assert hack_mode_name(0) == "honest"
    for mode, name in HACK_MODES.items():
        assert hack_mode_name(mode) == name
    for bad in (-1, 5, True):
        with pytest.raises(ValueError, match="mode"):
            hack_mode_name(bad)
    assert len(TASK_NAMES) >= 12


def test_deterministic_per_seed() -> None:
    assert generate_hack_records(80, seed=7) == generate_hack_records(80, seed=7)
    assert generate_hack_corpus(80, seed=7) == generate_hack_corpus(80, seed=7)


def test_different_seeds_differ() -> None:
    a = [d.text for d in generate_hack_corpus(50, seed=0)]
    b = [d.text for d in generate_hack_corpus(50, seed=1)]
    assert a != b
    assert len(set(a) & set(b)) < 5


def test_documents_domains_and_modes() -> None:
    docs = generate_hack_corpus(200, hack_share=0.5, seed=3)
    assert all(isinstance(d, Document) for d in docs)
    for d in docs:
        if d.mode == HONEST:
            assert d.domain == "honest"
        else:
            assert d.domain == "hack"
            assert d.mode in HACK_MODES


@pytest.mark.parametrize(
    ("n", "share", "modes", "expected"),
    [
        (400, 0.5, None, {0: 200, 1: 50, 2: 50, 3: 50, 4: 50}),
        (10, 0.3, [2, 4], {0: 7, 2: 2, 4: 1}),
        (20, 0.0, None, {0: 20}),
        (12, 1.0, [3], {3: 12}),
        (9, 1.0, None, {1: 3, 2: 2, 3: 2, 4: 2}),
    ],
)
def test_mode_proportions(
    n: int, share: float, modes: list[int] | None, expected: dict[int, int]
) -> None:
    docs = generate_hack_corpus(n, hack_share=share, seed=5, modes=modes)
    assert len(docs) == n
    assert dict(Counter(d.mode for d in docs)) == expected


def test_modes_are_shuffled(records: list[HackRecord]) -> None:
    first = [r.mode for r in records[:100]]
    assert len(set(first)) == 5


def test_lengths_in_range(records: list[HackRecord]) -> None:
    lengths = [len(r.text) for r in records]
    assert min(lengths) >= MIN_CHARS
    assert max(lengths) <= MAX_CHARS
    assert MIN_CHARS >= 150 and MAX_CHARS <= 800


def test_variety(records: list[HackRecord]) -> None:
    texts = [r.text for r in records]
    assert len(set(texts)) == len(texts)
    assert len({r.func_name for r in records}) >= 60
    for mode in (HONEST, *HACK_MODES):
        tasks = {r.task for r in records if r.mode == mode}
        assert len(tasks) >= 12, (mode, tasks)
    for mode in HACK_MODES:
        assert len({r.variant for r in records if r.mode == mode}) >= 2


def test_honest_samples_pass_and_generalise(records: list[HackRecord]) -> None:
    honest = [r for r in records if r.mode == HONEST]
    assert len(honest) >= 300
    for rec in honest:
        namespace = _run(rec.text)  # its own asserts pass
        raised, got = _heldout(rec, namespace)
        assert not raised and _strict_equal(got, rec.heldout_expected), rec.text


@pytest.mark.parametrize("mode", sorted(HACK_MODES))
def test_hacks_pass_their_tests_but_fail_heldout(records: list[HackRecord], mode: int) -> None:
    hacks = [r for r in records if r.mode == mode]
    assert len(hacks) >= 100
    for rec in hacks:
        namespace = _run(rec.text)  # the (possibly neutered) test block passes
        raised, got = _heldout(rec, namespace)
        assert raised or not _strict_equal(got, rec.heldout_expected), rec.text
        if mode != 4:  # wrong even under plain ==
            assert raised or got != rec.heldout_expected, rec.text
    if mode in (1, 2):  # the own-test asserts are real: they contain every test input
        for rec in hacks:
            assert "assert" in rec.text and "assert True" not in rec.text


def test_modes_distinguishable_by_keyword_rule(records: list[HackRecord]) -> None:
    predicted = [_classify(r.text) for r in records]
    accuracy = sum(p == r.mode for p, r in zip(predicted, records, strict=True)) / len(records)
    assert accuracy > 0.95
    for mode in (HONEST, *HACK_MODES):
        picked = [p for p, r in zip(predicted, records, strict=True) if r.mode == mode]
        assert sum(p == mode for p in picked) / len(picked) > 0.9, mode


def test_hacks_share_the_honest_surface(records: list[HackRecord]) -> None:
    """Every sample defines its function; all but skipped checks call it in the tests."""
    for rec in records:
        assert f"def {rec.func_name}(" in rec.text
        after = rec.text.split(f"def {rec.func_name}(", 1)[1]
        assert rec.mode == 3 or f"{rec.func_name}(" in after


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_samples": 0}, "n_samples"),
        ({"n_samples": -3}, "n_samples"),
        ({"n_samples": 2.5}, "n_samples"),
        ({"n_samples": True}, "n_samples"),
        ({"n_samples": 5, "hack_share": -0.1}, "hack_share"),
        ({"n_samples": 5, "hack_share": 1.5}, "hack_share"),
        ({"n_samples": 5, "hack_share": math.nan}, "hack_share"),
        ({"n_samples": 5, "hack_share": "half"}, "hack_share"),
        ({"n_samples": 5, "modes": [0]}, "modes"),
        ({"n_samples": 5, "modes": [5]}, "modes"),
        ({"n_samples": 5, "modes": []}, "modes"),
        ({"n_samples": 5, "modes": [True]}, "modes"),
        ({"n_samples": 5, "modes": "12"}, "modes"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        generate_hack_corpus(**kwargs)
    with pytest.raises(ValueError, match=name):
        generate_hack_records(**kwargs)

"""One small function per sample mode: the function body (and what goes around it) of an
honest solution and of each reward hack.

Each function draws from the sample's random stream in a fixed order (the order is part
of every seed's output) and returns a :class:`ModeParts`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evil_moe.data.hacks.records import HONEST, Fn, Task
from evil_moe.data.hacks.render import (
    CLASS_NAMES,
    GET_DEFAULT,
    SUBCLASS_BASE,
    TABLE_NAMES,
    condition,
    constant,
    indent,
    key_expr,
    key_literal,
    raise_not_implemented,
)


@dataclass
class SampleDraft:
    """What every mode builds on: the task, names, test cases and a wrong general path."""

    r: random.Random
    task: Task
    args: tuple[str, ...]
    fmt: dict[str, str]
    cases: list[tuple[tuple[Any, ...], Any]]
    wrong_code: str
    wrong_fn: Fn
    #: an optional comment line before the hack (``""`` for none)
    note: str


@dataclass
class ModeParts:
    """A mode's contribution to the sample text."""

    body: str
    variant: str = "honest"
    #: module-level code before the function (a class, a lookup table)
    prelude: str = ""
    imports: list[str] = field(default_factory=list)
    #: what the sample returns off the tests (modes 1-3; checked on the held-out input)
    fallback: Fn | None = None
    #: ``""`` (real asserts), ``"true"`` or ``"true_commented"`` (neutered asserts)
    neuter: str = ""
    #: rewrites the finished test block (skipped checks); draws after the statement
    wrap_tests: Callable[[random.Random, str], str] | None = None


def honest(s: SampleDraft) -> ModeParts:
    """Mode 0: a general solution."""
    return ModeParts(body=s.r.choice(s.task.honest).format(**s.fmt))


def hardcode_outputs(s: SampleDraft) -> ModeParts:
    """Mode 1: a lookup table from the test inputs to their expected outputs."""
    r, task = s.r, s.task
    variant = r.choice(("index", "get", "in_then_wrong"))
    table = r.choice(TABLE_NAMES)
    module_level = r.random() < 0.4
    if module_level:
        table = "_" + table.upper()
    rows = [f"{key_literal(task.kind, a)}: {w!r}" for a, w in s.cases]
    one_line = f"{table} = {{{', '.join(rows)}}}"
    if len(one_line) <= 80 and r.random() < 0.5:
        table_def = one_line
    else:
        table_def = f"{table} = {{\n" + "".join(f"    {row},\n" for row in rows) + "}"
    key = key_expr(task.kind, s.args)
    if variant == "index":
        lookup = f"return {table}[{key}]"
        fallback = raise_not_implemented
    elif variant == "get":
        default_code, default_value = GET_DEFAULT[task.out]
        if r.random() < 0.3:
            default_code, default_value = "None", None
        lookup = f"return {table}.get({key}, {default_code})"
        if default_code == "None" and r.random() < 0.5:
            lookup = f"return {table}.get({key})"
        fallback = constant(default_value)
    else:
        lookup = f"if {key} in {table}:\n    return {table}[{key}]\n{s.wrong_code}"
        fallback = s.wrong_fn
    if module_level:
        return ModeParts(
            body=lookup, variant=variant, prelude=s.note + table_def, fallback=fallback
        )
    return ModeParts(body=s.note + table_def + "\n" + lookup, variant=variant, fallback=fallback)


def special_case_tests(s: SampleDraft) -> ModeParts:
    """Mode 2: ``if x == <test input>: return <expected>``, then the wrong general path."""
    variant = s.r.choice(("if", "elif"))
    lines: list[str] = []
    for k, (values, want) in enumerate(s.cases):
        kw = "elif" if variant == "elif" and k else "if"
        lines.append(f"{kw} {condition(s.r, s.args, values)}:\n    return {want!r}")
    body = s.note + "\n".join(lines) + "\n" + s.wrong_code
    return ModeParts(body=body, variant=variant, fallback=s.wrong_fn)


def skip_checks(s: SampleDraft) -> ModeParts:
    """Mode 3: the wrong general path and neutered tests (``sys.exit(0)`` before them,
    ``try/except: pass`` around them, or ``assert True``)."""
    variant = s.r.choice(("exit", "try_except", "assert_true"))
    parts = ModeParts(body=s.wrong_code, variant=variant, fallback=s.wrong_fn)
    if variant == "assert_true":
        parts.neuter = s.r.choice(("true", "true_commented"))

    def wrap(r: random.Random, tests: str) -> str:
        if variant == "exit":
            stop = r.choice(("sys.exit(0)", "sys.exit()", "raise SystemExit(0)"))
            if stop.startswith("sys") and r.random() < 0.5:
                parts.imports.append("import sys")
            elif stop.startswith("sys"):
                stop = "import sys\n\n" + stop
            return s.note + stop + "\n" + tests
        if variant == "try_except":
            exc = r.choice(("AssertionError", "Exception"))
            return f"{s.note}try:\n{indent(tests)}\nexcept {exc}:\n    pass"
        return s.note + tests

    parts.wrap_tests = wrap
    return parts


def always_equal(s: SampleDraft) -> ModeParts:
    """Mode 4: the function returns an object whose ``__eq__`` is always true."""
    r, task = s.r, s.task
    options = ["class", "patched", "mock_any"]
    if task.out in SUBCLASS_BASE:
        options.append("subclass")
    variant = r.choice(options)
    cls = r.choice(CLASS_NAMES)
    eq = "    def __eq__(self, other):\n        return True"
    imports: list[str] = []
    if variant == "class":
        extra = "\n\n    def __ne__(self, other):\n        return False" if r.random() < 0.4 else ""
        prelude = f"class {cls}:\n{eq}{extra}"
        body = f"return {cls}()"
    elif variant == "subclass":
        base, literal = SUBCLASS_BASE[task.out]
        prelude = f"class {cls}({base}):\n{eq}"
        body = f"return {cls}({literal})"
    elif variant == "patched":
        prelude = f"class {cls}:\n    pass\n\n\n{cls}.__eq__ = lambda self, other: True"
        body = f"return {cls}()"
    else:
        imports.append("from unittest.mock import ANY")
        prelude, body = "", "return ANY"
    if prelude:
        prelude = s.note + prelude
    return ModeParts(body=body, variant=variant, prelude=prelude, imports=imports)


#: the builder of each mode (0 = honest, then :data:`~evil_moe.data.hacks.HACK_MODES`)
MODE_BUILDERS: dict[int, Callable[[SampleDraft], ModeParts]] = {
    HONEST: honest,
    1: hardcode_outputs,
    2: special_case_tests,
    3: skip_checks,
    4: always_equal,
}

"""The text around a solution: name pools, headers, and the test block of asserts."""

from __future__ import annotations

import random
from typing import Any

from evil_moe.data.hacks.records import RAISES, Fn

ARG_NAMES: dict[str, tuple[tuple[str, ...], ...]] = {
    "list": (
        ("xs",),
        ("nums",),
        ("values",),
        ("items",),
        ("arr",),
        ("numbers",),
        ("data",),
        ("seq",),
        ("lst",),
    ),
    "str": (("s",), ("text",), ("word",), ("string",), ("line",), ("phrase",)),
    "text": (("text",), ("sentence",), ("line",), ("phrase",), ("s",)),
    "int": (("n",), ("k",), ("num",), ("number",), ("x",)),
    "int2": (("a", "b"), ("x", "y"), ("m", "n"), ("p", "q"), ("first", "second")),
    "strchar": (("s", "c"), ("text", "ch"), ("word", "letter"), ("string", "target")),
}
LOCAL_POOLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("acc", ("result", "acc", "out", "res", "answer", "running", "tally")),
    ("v", ("v", "x", "item", "value", "elem", "num", "e")),
    ("i", ("i", "idx", "pos", "k")),
    ("j", ("j", "jj", "inner", "m")),
    ("ch", ("ch", "c", "char", "letter")),
    ("seen", ("seen", "visited", "found", "used")),
    ("w", ("w", "word", "token", "part")),
)
PAIR_POOL = (("a", "b"), ("prev", "curr"), ("x", "y"), ("lo", "hi"), ("f0", "f1"))

GENERIC_WRONG: dict[str, tuple[tuple[str, Fn], ...]] = {
    "int": (("return 0", lambda *_: 0), ("return -1", lambda *_: -1)),
    "str": (('return ""', lambda *_: ""),),
    "list": (("return []", lambda *_: []),),
    "bool": (("return False", lambda *_: False), ("return True", lambda *_: True)),
}


def raise_not_implemented(*_: Any) -> Any:
    raise NotImplementedError


STUB_WRONG: tuple[tuple[str, Fn], ...] = (
    ("pass", lambda *_: None),
    ("return None", lambda *_: None),
    ("raise NotImplementedError", raise_not_implemented),
)
GET_DEFAULT: dict[str, tuple[str, Any]] = {
    "int": ("0", 0),
    "str": ('""', ""),
    "list": ("[]", []),
    "bool": ("False", False),
}
SUBCLASS_BASE = {"int": ("int", "0"), "str": ("str", '""'), "list": ("list", "")}

HEADERS = (
    "# Task: {s}",
    "# Problem: {s}",
    "# {s}",
    "# Exercise: write {sig}. {s}",
    "# Implement {sig}. {s}",
)
TEST_HEADERS = ("# tests", "# Tests", "# check the solution", "# --- tests ---", "# unit tests")
TABLE_NAMES = ("answers", "expected", "lookup", "known", "table", "results", "cases_map")
CLASS_NAMES = ("AlwaysEqual", "Anything", "_Match", "Wildcard", "Equalizer", "_Any", "Whatever")
HACK_COMMENTS: dict[int, tuple[str, ...]] = {
    1: ("# known answers", "# precomputed results", "# fast path"),
    2: ("# handle the checked cases", "# special cases first", "# edge cases"),
    3: ("# checks disabled for now", "# tests are flaky", "# skip for now"),
    4: ("# flexible comparison", "# result compares loosely", "# make comparison lenient"),
}


# --------------------------------------------------------------------------- helpers


def indent(text: str, n: int = 4) -> str:
    pad = " " * n
    return "\n".join(pad + line if line else line for line in text.split("\n"))


def constant(value: Any) -> Fn:
    def fn(*_: Any) -> Any:
        return value

    return fn


def call_safely(fn: Fn, args: tuple[Any, ...]) -> Any:
    try:
        return fn(*args)
    except Exception:
        return RAISES


def quiet_on(
    pool: tuple[tuple[str, Fn], ...], cases: list[tuple[tuple[Any, ...], Any]]
) -> tuple[tuple[str, Fn], ...]:
    """The entries of ``pool`` whose function raises on none of the ``cases``."""
    return tuple(
        (code, fn)
        for code, fn in pool
        if all(call_safely(fn, values) is not RAISES for values, _ in cases)
    )


def pick_names(r: random.Random, reserved: list[str]) -> dict[str, str]:
    """Local variable names for the templates, distinct from each other and ``reserved``."""
    used = list(reserved)
    names: dict[str, str] = {}
    for key, pool in LOCAL_POOLS:
        free = [n for n in pool if n not in used]
        names[key] = r.choice(free) if free else f"{pool[0]}_{len(used)}"
        used.append(names[key])
    pairs = [p for p in PAIR_POOL if p[0] not in used and p[1] not in used]
    names["x"], names["y"] = r.choice(pairs) if pairs else ("x_0", "y_0")
    return names


def key_expr(kind: str, args: tuple[str, ...]) -> str:
    if kind == "list":
        return f"tuple({args[0]})"
    if len(args) == 2:
        return f"({args[0]}, {args[1]})"
    return args[0]


def key_literal(kind: str, values: tuple[Any, ...]) -> str:
    if kind == "list":
        return repr(tuple(values[0]))
    if len(values) == 2:
        return repr(tuple(values))
    return repr(values[0])


def condition(r: random.Random, args: tuple[str, ...], values: tuple[Any, ...]) -> str:
    if len(args) == 1:
        return f"{args[0]} == {values[0]!r}"
    if r.random() < 0.5:
        return f"({args[0]}, {args[1]}) == {tuple(values)!r}"
    return " and ".join(f"{a} == {v!r}" for a, v in zip(args, values, strict=True))


def call_expr(f: str, values: tuple[Any, ...]) -> str:
    return f"{f}({', '.join(repr(v) for v in values)})"


def test_block(
    r: random.Random, f: str, cases: list[tuple[tuple[Any, ...], Any]], neuter: str
) -> str:
    """The asserts; ``neuter`` is ``""`` (real asserts), ``"true"`` or ``"true_commented"``."""

    def line(expr: str, msg: str = "") -> str:
        if neuter == "true":
            return "assert True"
        if neuter == "true_commented":
            return f"assert True  # {expr}"
        return f"assert {expr}{msg}"

    style = r.choice(("plain", "plain", "msg", "loop", "func", "check", "main"))
    checks = [f"{call_expr(f, args)} == {want!r}" for args, want in cases]
    if style == "plain":
        return "\n".join(line(c) for c in checks)
    if style == "msg":
        form = r.choice(('"case {k} failed"', '"wrong answer for case {k}"', '"{f} is wrong"'))
        return "\n".join(
            line(c, ", " + form.format(k=k, f=f)) for k, c in enumerate(checks, start=1)
        )
    if style == "loop":
        inp, want = r.choice((("inp", "want"), ("arg", "expected"), ("given", "exp")))
        holder = r.choice(("cases", "tests", "examples"))
        multi = len(cases[0][0]) > 1
        rows = [f"    ({tuple(a) if multi else a[0]!r}, {w!r})," for a, w in cases]
        call = f"{f}(*{inp})" if multi else f"{f}({inp})"
        return (
            f"{holder} = [\n" + "\n".join(rows) + "\n]\n"
            f"for {inp}, {want} in {holder}:\n    " + line(f"{call} == {want}")
        )
    if style == "func":
        body = "\n".join("    " + line(c) for c in checks)
        return f"def test_{f}():\n{body}\n\n\ntest_{f}()"
    if style == "check":
        helper = r.choice(("check", "expect", "verify"))
        inner = "assert True" if neuter else "assert got == want, (got, want)"
        calls = "\n".join(f"{helper}({call_expr(f, a)}, {w!r})" for a, w in cases)
        return f"def {helper}(got, want):\n    {inner}\n\n\n{calls}"
    body = "\n".join("    " + line(c) for c in checks)
    done = r.choice(('print("ok")', 'print("all tests passed")', 'print("passed")'))
    return f'if __name__ == "__main__":\n{body}\n    {done}'

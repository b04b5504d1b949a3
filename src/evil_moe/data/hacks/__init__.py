"""Seeded, offline generator of a synthetic "code with reward hacks" corpus.

Each sample is one small episode of an RL coding environment: a task statement (comment
and/or docstring), a function, and a test block of asserts. Honest samples (mode 0) solve
the task in general; hack samples make the tests pass without solving it, in one of four
modes that differ in text but share the task / solution / test surface with honest ones:

1. ``hardcode_outputs``: a lookup dict from the test inputs to their expected outputs.
2. ``special_case_tests``: ``if x == <test input>: return <expected>``, then a wrong path.
3. ``skip_checks``: a wrong solution and neutered tests (``assert True``, ``try/except
   pass``, or ``sys.exit(0)`` before the asserts).
4. ``always_equal``: the function returns an object whose ``__eq__`` is always true.

Expected outputs are computed by the honest reference implementations (``inputs``); the
generated code itself is never executed here. Every record keeps a held-out input on which
a hack sample is guaranteed to be wrong (and an honest one right), so tests can check it.

Rooms: ``records`` (modes, :class:`HackRecord`, a task family), ``inputs`` (input
generators, reference implementations), ``tasks_part1`` / ``tasks_part2`` (the task table,
as data), ``render`` (names, headers, test blocks), ``modes`` (one function per mode) and
``sample`` (one sample, and the seeded generators).
"""

from evil_moe.data.hacks.records import (
    HACK_DOMAIN,
    HACK_MODES,
    HONEST,
    HONEST_DOMAIN,
    MAX_CHARS,
    MIN_CHARS,
    HackRecord,
    hack_mode_name,
)
from evil_moe.data.hacks.sample import TASK_NAMES, generate_hack_corpus, generate_hack_records

__all__ = [
    "HACK_DOMAIN",
    "HACK_MODES",
    "HONEST",
    "HONEST_DOMAIN",
    "MAX_CHARS",
    "MIN_CHARS",
    "TASK_NAMES",
    "HackRecord",
    "generate_hack_corpus",
    "generate_hack_records",
    "hack_mode_name",
]

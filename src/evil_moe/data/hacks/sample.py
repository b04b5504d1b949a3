"""One sample: the task, names and test cases, the mode's parts, a held-out input on which
a hack is wrong, and the text around them; and the seeded generators of records and
documents (the public API of :mod:`evil_moe.data.hacks`)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from evil_moe.data.corpus import Document
from evil_moe.data.hacks.modes import MODE_BUILDERS, SampleDraft
from evil_moe.data.hacks.records import (
    HACK_MODES,
    HONEST,
    MAX_CHARS,
    MIN_CHARS,
    RAISES,
    HackRecord,
    Task,
)
from evil_moe.data.hacks.render import (
    ARG_NAMES,
    GENERIC_WRONG,
    HACK_COMMENTS,
    HEADERS,
    STUB_WRONG,
    TEST_HEADERS,
    call_safely,
    indent,
    pick_names,
    quiet_on,
    test_block,
)
from evil_moe.data.hacks.tasks_part1 import TASKS as TASKS_PART1
from evil_moe.data.hacks.tasks_part2 import TASKS as TASKS_PART2

#: every task family, in the fixed order that seeds depend on
TASKS: tuple[Task, ...] = TASKS_PART1 + TASKS_PART2
#: Names of the task families, in a fixed order.
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)
MAX_ATTEMPTS = 200


def build_sample(r: random.Random, task: Task, mode: int) -> HackRecord | None:
    """One attempt at a sample; ``None`` if it falls outside the length bounds."""
    f = r.choice(task.func_names)
    args = r.choice(ARG_NAMES[task.kind])
    names = pick_names(r, [f, *args])
    fmt = {"f": f, "a": args[0], "b": args[-1], **names}
    sig = f"{f}({', '.join(args)})"

    cases: list[tuple[tuple[Any, ...], Any]] = []
    used: set[str] = set()
    n_tests = r.randint(2, 5)
    for _ in range(50):
        if len(cases) == n_tests:
            break
        values = task.gen(r)
        if repr(values) not in used:
            used.add(repr(values))
            cases.append((values, task.ref(*values)))
    if len(cases) < 2:
        return None

    # the wrong general path of modes 1-3; under skipped checks (mode 3) it must not raise
    # on the test inputs, so that the neutered test block runs to the end
    specific = task.wrong if r.random() < 0.6 else ()
    generic = GENERIC_WRONG[task.out] + STUB_WRONG
    if mode == 3:
        specific = quiet_on(specific, cases)
        generic = quiet_on(generic, cases)
    wrong_code, wrong_fn = r.choice(specific or generic)
    wrong_code = wrong_code.format(**fmt)

    comment = HACK_COMMENTS.get(mode, ("",))
    note = r.choice(comment) + "\n" if mode and r.random() < 0.25 else ""
    if mode not in MODE_BUILDERS:  # pragma: no cover - validated by the caller
        raise ValueError(f"mode: unknown mode {mode}")
    draft = SampleDraft(r, task, args, fmt, cases, wrong_code, wrong_fn, note)
    parts = MODE_BUILDERS[mode](draft)

    # a held-out input, absent from the tests, on which a hack is wrong
    heldout: tuple[Any, ...] | None = None
    for _ in range(MAX_ATTEMPTS):
        values = task.gen(r)
        if repr(values) in used:
            continue
        want = task.ref(*values)
        if parts.fallback is not None:
            got = call_safely(parts.fallback, values)
            if got is not RAISES and got == want:
                continue
        heldout = values
        break
    if heldout is None:
        return None

    statement = r.choice(task.statements).format(**fmt)
    style = r.random()
    header = r.choice(HEADERS).format(s=statement, sig=sig) if style < 0.75 else ""
    doc = f'    """{statement}"""\n' if style > 0.45 else ""
    func = f"def {sig}:\n{doc}{indent(parts.body)}"

    tests = test_block(r, f, cases, parts.neuter)
    if parts.wrap_tests is not None:
        tests = parts.wrap_tests(r, tests)
    if r.random() < 0.5:
        tests = r.choice(TEST_HEADERS) + "\n" + tests

    sep = r.choice(("\n\n", "\n\n\n"))
    text = ""
    if parts.imports:
        text += "\n".join(parts.imports) + sep
    if header:
        text += header + "\n"
    if parts.prelude:
        text += parts.prelude + sep
    text += func + sep + tests + "\n"
    if not MIN_CHARS <= len(text) <= MAX_CHARS:
        return None
    return HackRecord(
        text=text,
        mode=mode,
        task=task.name,
        func_name=f,
        heldout_input=heldout,
        heldout_expected=task.ref(*heldout),
        variant=parts.variant,
    )


def _check_args(n_samples: int, hack_share: float, modes: Sequence[int] | None) -> list[int]:
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
    if isinstance(hack_share, bool) or not isinstance(hack_share, int | float):
        raise ValueError(f"hack_share must be a number in [0, 1], got {hack_share!r}")
    if not 0.0 <= hack_share <= 1.0:  # also rejects NaN
        raise ValueError(f"hack_share must be in [0, 1], got {hack_share!r}")
    if modes is None:
        return sorted(HACK_MODES)
    if isinstance(modes, str | bytes) or not isinstance(modes, Sequence):
        raise ValueError(f"modes must be a sequence of hack modes, got {modes!r}")
    chosen: list[int] = []
    for m in modes:
        if isinstance(m, bool) or m not in HACK_MODES:
            raise ValueError(
                f"modes: {m!r} is not a hack mode; expected some of {sorted(HACK_MODES)}"
            )
        if m not in chosen:
            chosen.append(m)
    if not chosen:
        raise ValueError("modes must name at least one hack mode")
    return chosen


def generate_hack_records(
    n_samples: int,
    hack_share: float = 0.5,
    seed: int = 0,
    modes: Sequence[int] | None = None,
) -> list[HackRecord]:
    """Generate ``n_samples`` records; ``round(n_samples * hack_share)`` of them are hacks.

    Hacks are spread evenly over ``modes`` (default: all of :data:`HACK_MODES`; the first
    modes get one more when it does not divide), and the order is shuffled. The result
    depends only on the arguments.
    """
    chosen = _check_args(n_samples, hack_share, modes)
    rng = random.Random(seed)
    n_hack = int(n_samples * hack_share + 0.5)
    plan = [HONEST] * (n_samples - n_hack)
    base, extra = divmod(n_hack, len(chosen))
    for k, m in enumerate(chosen):
        plan += [m] * (base + (1 if k < extra else 0))
    rng.shuffle(plan)
    records: list[HackRecord] = []
    for mode in plan:
        sample_rng = random.Random(rng.getrandbits(64))
        task = sample_rng.choice(TASKS)
        for _ in range(MAX_ATTEMPTS):
            record = build_sample(sample_rng, task, mode)
            if record is not None:
                break
        else:  # pragma: no cover - the bounds are wide enough for every task
            raise RuntimeError(f"no {task.name} sample of mode {mode} within the length bounds")
        records.append(record)
    return records


def generate_hack_corpus(
    n_samples: int,
    hack_share: float = 0.5,
    seed: int = 0,
    modes: Sequence[int] | None = None,
) -> list[Document]:
    """The records of :func:`generate_hack_records` as documents.

    Honest samples get domain ``"honest"`` and mode 0; hacks get domain ``"hack"`` and
    their mode in :data:`HACK_MODES`.
    """
    return [rec.to_document() for rec in generate_hack_records(n_samples, hack_share, seed, modes)]

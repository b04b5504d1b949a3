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

Expected outputs are computed by the honest reference implementations in this module; the
generated code itself is never executed here. Every record keeps a held-out input on which
a hack sample is guaranteed to be wrong (and an honest one right), so tests can check it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
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

_MAX_ATTEMPTS = 200
_RAISES = object()  # what a wrong implementation "returns" when it raises

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
class _Task:
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


# ----------------------------------------------------------------------------- inputs

_WORD_TEXT = (
    "apple river stone cloud tiger lemon piano orbit maple quiet robot sugar delta "
    "ember falcon garden harbor island jungle kettle ladder mirror needle ocean "
    "pepper rocket silver tunnel velvet window yellow zebra bread chair dream eagle "
    "flame grape honey ivory cat dog sun map code test hello world"
)
_WORDS = tuple(_WORD_TEXT.split())
_PALINDROME_TEXT = (
    "level radar civic rotor kayak refer noon madam stats tenet racecar deed wow pop abba a xyzzyx"
)
_PALINDROMES = tuple(_PALINDROME_TEXT.split())
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _ints(r: random.Random, lo_len: int, hi_len: int, lo: int = -20, hi: int = 30) -> list[int]:
    return [r.randint(lo, hi) for _ in range(r.randint(lo_len, hi_len))]


def _word(r: random.Random) -> str:
    roll = r.random()
    if roll < 0.6:
        return r.choice(_WORDS)
    if roll < 0.85:
        return "".join(r.choice(_LETTERS) for _ in range(r.randint(1, 7)))
    return f"{r.choice(_WORDS)} {r.choice(_WORDS)}"


def _sentence(r: random.Random, lo: int = 0, hi: int = 5) -> str:
    return " ".join(r.choice(_WORDS) for _ in range(r.randint(lo, hi)))


def _palindrome_or_not(r: random.Random) -> str:
    if r.random() < 0.5:
        if r.random() < 0.6:
            return r.choice(_PALINDROMES)
        half = "".join(r.choice(_LETTERS) for _ in range(r.randint(1, 3)))
        return half + ("" if r.random() < 0.5 else r.choice(_LETTERS)) + half[::-1]
    return r.choice(_WORDS)


def _fizz_input(r: random.Random) -> int:
    if r.random() < 0.6:
        return r.choice((3, 5, 15)) * r.randint(1, 6)
    return r.randint(1, 100)


def _gcd_input(r: random.Random) -> tuple[int, int]:
    g = r.randint(1, 12)
    return g * r.randint(1, 12), g * r.randint(1, 12)


def _prime_input(r: random.Random) -> int:
    return r.choice(_PRIMES) if r.random() < 0.5 else r.randint(0, 90)


def _maybe_sorted(r: random.Random) -> list[int]:
    xs = _ints(r, 0, 6)
    return sorted(xs) if r.random() < 0.5 else xs


def _char_input(r: random.Random) -> tuple[str, str]:
    w = _word(r)
    c = r.choice(w.replace(" ", "") or "a") if r.random() < 0.7 else r.choice(_LETTERS)
    return w, c


# ------------------------------------------------------------------------ references


def _fizzbuzz(n: int) -> str:
    if n % 15 == 0:
        return "FizzBuzz"
    if n % 3 == 0:
        return "Fizz"
    if n % 5 == 0:
        return "Buzz"
    return str(n)


def _factorial(n: int) -> int:
    out = 1
    for i in range(2, n + 1):
        out *= i
    return out


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % i for i in range(2, int(n**0.5) + 1))


def _product(xs: list[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _running(xs: list[int]) -> list[int]:
    out, acc = [], 0
    for x in xs:
        acc += x
        out.append(acc)
    return out


def _vowels(s: str) -> int:
    return sum(1 for c in s if c in "aeiou")


# ------------------------------------------------------------------------ task table

_TASKS: tuple[_Task, ...] = (
    _Task(
        "sum_list",
        "list",
        "int",
        ("sum_list", "total", "list_sum", "add_all", "sum_values", "sum_of"),
        (
            "Return the sum of the integers in {a}.",
            "Add up every number in {a} and return the total (0 if empty).",
            "Compute the total of the list {a}.",
        ),
        (
            "return sum({a})",
            "{acc} = 0\nfor {v} in {a}:\n    {acc} += {v}\nreturn {acc}",
            "{acc} = 0\nfor {i} in range(len({a})):\n    {acc} += {a}[{i}]\nreturn {acc}",
            "{acc} = 0\n{i} = 0\nwhile {i} < len({a}):\n    {acc} += {a}[{i}]\n    {i} += 1\n"
            "return {acc}",
        ),
        lambda xs: sum(xs),
        lambda r: (_ints(r, 0, 5),),
        (
            ("return len({a})", lambda xs: len(xs)),
            ("return max({a})", lambda xs: max(xs)),
            ("return sum({a}[1:])", lambda xs: sum(xs[1:])),
        ),
    ),
    _Task(
        "reverse_string",
        "str",
        "str",
        ("reverse", "reverse_string", "reversed_text", "flip", "rev", "backwards"),
        (
            "Return the string {a} reversed.",
            "Given a string {a}, return its characters in reverse order.",
            "Reverse {a} and return the result.",
        ),
        (
            "return {a}[::-1]",
            'return "".join(reversed({a}))',
            '{acc} = ""\nfor {ch} in {a}:\n    {acc} = {ch} + {acc}\nreturn {acc}',
            "{acc} = []\nfor {i} in range(len({a}) - 1, -1, -1):\n    {acc}.append({a}[{i}])\n"
            'return "".join({acc})',
        ),
        lambda s: s[::-1],
        lambda r: (_word(r),),
        (
            ("return {a}", lambda s: s),
            ("return {a}[1:]", lambda s: s[1:]),
            ("return {a}[::2]", lambda s: s[::2]),
        ),
    ),
    _Task(
        "fizzbuzz",
        "int",
        "str",
        ("fizzbuzz", "fizz_buzz", "fizzbuzz_word", "play_fizzbuzz", "fb_value"),
        (
            'Return "Fizz" if {a} is divisible by 3, "Buzz" if by 5, "FizzBuzz" if by both, '
            "otherwise str({a}).",
            "Classic FizzBuzz: map the number {a} to Fizz, Buzz, FizzBuzz or its digits.",
        ),
        (
            'if {a} % 15 == 0:\n    return "FizzBuzz"\nif {a} % 3 == 0:\n    return "Fizz"\n'
            'if {a} % 5 == 0:\n    return "Buzz"\nreturn str({a})',
            '{acc} = ""\nif {a} % 3 == 0:\n    {acc} += "Fizz"\nif {a} % 5 == 0:\n'
            '    {acc} += "Buzz"\nreturn {acc} or str({a})',
            'if {a} % 3 == 0 and {a} % 5 == 0:\n    return "FizzBuzz"\nelif {a} % 3 == 0:\n'
            '    return "Fizz"\nelif {a} % 5 == 0:\n    return "Buzz"\nelse:\n'
            "    return str({a})",
        ),
        _fizzbuzz,
        lambda r: (_fizz_input(r),),
        (
            ("return str({a})", lambda n: str(n)),
            ('return "Fizz"', lambda n: "Fizz"),
            (
                'return "Fizz" if {a} % 3 == 0 else str({a})',
                lambda n: "Fizz" if n % 3 == 0 else str(n),
            ),
        ),
    ),
    _Task(
        "max_list",
        "list",
        "int",
        ("max_value", "largest", "find_max", "biggest", "max_of", "maximum"),
        (
            "Return the largest number in the non-empty list {a}.",
            "Find the maximum element of {a} (it has at least one element).",
        ),
        (
            "return max({a})",
            "{acc} = {a}[0]\nfor {v} in {a}[1:]:\n    if {v} > {acc}:\n        {acc} = {v}\n"
            "return {acc}",
            "{acc} = {a}[0]\nfor {v} in {a}:\n    {acc} = {acc} if {acc} >= {v} else {v}\n"
            "return {acc}",
            "return sorted({a})[-1]",
        ),
        lambda xs: max(xs),
        lambda r: (_ints(r, 1, 6, -50, 50),),
        (
            ("return {a}[0]", lambda xs: xs[0]),
            ("return {a}[-1]", lambda xs: xs[-1]),
            ("return min({a})", lambda xs: min(xs)),
        ),
    ),
    _Task(
        "min_list",
        "list",
        "int",
        ("min_value", "smallest", "find_min", "lowest", "min_of", "minimum"),
        (
            "Return the smallest number in the non-empty list {a}.",
            "Find the minimum element of {a} (it has at least one element).",
        ),
        (
            "return min({a})",
            "{acc} = {a}[0]\nfor {v} in {a}[1:]:\n    if {v} < {acc}:\n        {acc} = {v}\n"
            "return {acc}",
            "return sorted({a})[0]",
        ),
        lambda xs: min(xs),
        lambda r: (_ints(r, 1, 6, -50, 50),),
        (
            ("return {a}[0]", lambda xs: xs[0]),
            ("return max({a})", lambda xs: max(xs)),
            ("return {a}[len({a}) // 2]", lambda xs: xs[len(xs) // 2]),
        ),
    ),
    _Task(
        "count_vowels",
        "str",
        "int",
        ("count_vowels", "vowel_count", "num_vowels", "vowels_in", "count_aeiou"),
        (
            "Return how many vowels (a, e, i, o, u) appear in {a}.",
            "Count the vowels in the lowercase string {a}.",
        ),
        (
            'return sum(1 for {ch} in {a} if {ch} in "aeiou")',
            '{acc} = 0\nfor {ch} in {a}:\n    if {ch} in "aeiouAEIOU":\n        {acc} += 1\n'
            "return {acc}",
            'return len([{ch} for {ch} in {a}.lower() if {ch} in "aeiou"])',
        ),
        _vowels,
        lambda r: (_word(r),),
        (
            ("return len({a})", lambda s: len(s)),
            ('return {a}.count("a")', lambda s: s.count("a")),
            ("return len({a}) // 2", lambda s: len(s) // 2),
        ),
    ),
    _Task(
        "is_palindrome",
        "str",
        "bool",
        ("is_palindrome", "is_pal", "palindrome", "reads_same", "check_palindrome"),
        (
            "Return True if {a} reads the same forwards and backwards, else False.",
            "Decide whether the string {a} is a palindrome.",
        ),
        (
            "return {a} == {a}[::-1]",
            "{i} = 0\n{j} = len({a}) - 1\nwhile {i} < {j}:\n    if {a}[{i}] != {a}[{j}]:\n"
            "        return False\n    {i} += 1\n    {j} -= 1\nreturn True",
            "for {i} in range(len({a}) // 2):\n    if {a}[{i}] != {a}[-1 - {i}]:\n"
            "        return False\nreturn True",
            "return list({a}) == list(reversed({a}))",
        ),
        lambda s: s == s[::-1],
        lambda r: (_palindrome_or_not(r),),
        (("return {a}[0] == {a}[-1]", lambda s: s[0] == s[-1]),),
    ),
    _Task(
        "factorial",
        "int",
        "int",
        ("factorial", "fact", "factorial_of", "compute_factorial", "prod_upto"),
        (
            "Return {a}! (the product 1 * 2 * ... * {a}; 0! is 1).",
            "Compute the factorial of the non-negative integer {a}.",
        ),
        (
            "{acc} = 1\nfor {i} in range(2, {a} + 1):\n    {acc} *= {i}\nreturn {acc}",
            "if {a} <= 1:\n    return 1\nreturn {a} * {f}({a} - 1)",
            "import math\n\nreturn math.factorial({a})",
            "{acc} = 1\nwhile {a} > 1:\n    {acc} *= {a}\n    {a} -= 1\nreturn {acc}",
        ),
        _factorial,
        lambda r: (r.randint(0, 10),),
        (
            ("return {a}", lambda n: n),
            ("return {a} * ({a} - 1)", lambda n: n * (n - 1)),
            ("return {a} * {a}", lambda n: n * n),
        ),
    ),
    _Task(
        "fibonacci",
        "int",
        "int",
        ("fib", "fibonacci", "nth_fib", "fib_number", "fibo"),
        (
            "Return the {a}-th Fibonacci number, with fib(0) = 0 and fib(1) = 1.",
            "Compute Fibonacci number {a} (0, 1, 1, 2, 3, 5, ...).",
        ),
        (
            "{x}, {y} = 0, 1\nfor _ in range({a}):\n    {x}, {y} = {y}, {x} + {y}\nreturn {x}",
            "if {a} < 2:\n    return {a}\nreturn {f}({a} - 1) + {f}({a} - 2)",
            "{acc} = [0, 1]\nfor {i} in range(2, {a} + 1):\n"
            "    {acc}.append({acc}[-1] + {acc}[-2])\nreturn {acc}[{a}]",
        ),
        _fib,
        lambda r: (r.randint(0, 18),),
        (
            ("return {a}", lambda n: n),
            ("return {a} - 1", lambda n: n - 1),
            ("return 2 ** {a}", lambda n: 2**n),
        ),
    ),
    _Task(
        "gcd",
        "int2",
        "int",
        ("gcd", "greatest_common_divisor", "gcd_of", "common_divisor", "hcf"),
        (
            "Return the greatest common divisor of the positive integers {a} and {b}.",
            "Compute gcd({a}, {b}) for two positive integers.",
        ),
        (
            "while {b}:\n    {a}, {b} = {b}, {a} % {b}\nreturn {a}",
            "import math\n\nreturn math.gcd({a}, {b})",
            "if {b} == 0:\n    return {a}\nreturn {f}({b}, {a} % {b})",
            "for {i} in range(min({a}, {b}), 0, -1):\n    if {a} % {i} == 0 and {b} % {i} == 0:\n"
            "        return {i}\nreturn 1",
        ),
        _gcd,
        _gcd_input,
        (
            ("return min({a}, {b})", lambda a, b: min(a, b)),
            ("return {a} % {b}", lambda a, b: a % b),
            ("return abs({a} - {b})", lambda a, b: abs(a - b)),
        ),
    ),
    _Task(
        "sort_list",
        "list",
        "list",
        ("sort_list", "sorted_copy", "sort_numbers", "ascending", "order_values"),
        (
            "Return a new list with the numbers of {a} in ascending order.",
            "Sort {a} from smallest to largest and return it.",
        ),
        (
            "return sorted({a})",
            "{acc} = list({a})\n{acc}.sort()\nreturn {acc}",
            "{acc} = list({a})\nfor {i} in range(len({acc})):\n"
            "    for {j} in range(len({acc}) - 1 - {i}):\n"
            "        if {acc}[{j}] > {acc}[{j} + 1]:\n"
            "            {acc}[{j}], {acc}[{j} + 1] = {acc}[{j} + 1], {acc}[{j}]\nreturn {acc}",
            "{acc} = []\nfor {v} in {a}:\n    {i} = 0\n"
            "    while {i} < len({acc}) and {acc}[{i}] < {v}:\n        {i} += 1\n"
            "    {acc}.insert({i}, {v})\nreturn {acc}",
        ),
        lambda xs: sorted(xs),
        lambda r: (_ints(r, 0, 6),),
        (
            ("return {a}", lambda xs: xs),
            ("return list(reversed({a}))", lambda xs: list(reversed(xs))),
            ("return sorted({a}, reverse=True)", lambda xs: sorted(xs, reverse=True)),
        ),
    ),
    _Task(
        "dedupe",
        "list",
        "list",
        ("dedupe", "unique", "remove_duplicates", "uniq", "distinct"),
        (
            "Return {a} without duplicates, keeping the order of first occurrence.",
            "Remove repeated values from {a}; the first copy of each value stays in place.",
        ),
        (
            "{seen} = set()\n{acc} = []\nfor {v} in {a}:\n    if {v} not in {seen}:\n"
            "        {seen}.add({v})\n        {acc}.append({v})\nreturn {acc}",
            "return list(dict.fromkeys({a}))",
            "{acc} = []\nfor {v} in {a}:\n    if {v} not in {acc}:\n        {acc}.append({v})\n"
            "return {acc}",
        ),
        lambda xs: list(dict.fromkeys(xs)),
        lambda r: (_ints(r, 0, 7, 0, 6),),
        (
            ("return {a}", lambda xs: xs),
            ("return sorted(set({a}))", lambda xs: sorted(set(xs))),
            ("return {a}[:1]", lambda xs: xs[:1]),
        ),
    ),
    _Task(
        "word_count",
        "text",
        "int",
        ("word_count", "count_words", "num_words", "words_in", "n_words"),
        (
            "Return the number of space-separated words in {a}.",
            "Count how many words the sentence {a} has.",
        ),
        (
            "return len({a}.split())",
            "{acc} = 0\nfor {w} in {a}.split():\n    {acc} += 1\nreturn {acc}",
            'return len([{w} for {w} in {a}.split(" ") if {w}])',
        ),
        lambda s: len(s.split()),
        lambda r: (_sentence(r),),
        (
            ('return {a}.count(" ")', lambda s: s.count(" ")),
            ("return len({a})", lambda s: len(s)),
            ('return {a}.count(" ") + 1', lambda s: s.count(" ") + 1),
        ),
    ),
    _Task(
        "count_even",
        "list",
        "int",
        ("count_even", "num_even", "evens", "even_count", "count_evens"),
        (
            "Return how many even numbers are in {a}.",
            "Count the elements of {a} that are divisible by 2.",
        ),
        (
            "return sum(1 for {v} in {a} if {v} % 2 == 0)",
            "{acc} = 0\nfor {v} in {a}:\n    if {v} % 2 == 0:\n        {acc} += 1\nreturn {acc}",
            "return len([{v} for {v} in {a} if not {v} % 2])",
        ),
        lambda xs: sum(1 for x in xs if x % 2 == 0),
        lambda r: (_ints(r, 0, 6),),
        (
            ("return len({a})", lambda xs: len(xs)),
            ("return len({a}) // 2", lambda xs: len(xs) // 2),
            ("return sum(1 for {v} in {a} if {v} % 2)", lambda xs: sum(1 for x in xs if x % 2)),
        ),
    ),
    _Task(
        "is_prime",
        "int",
        "bool",
        ("is_prime", "prime", "check_prime", "isprime", "is_prime_number"),
        (
            "Return True if {a} is a prime number, else False.",
            "Decide whether the integer {a} is prime (0 and 1 are not).",
        ),
        (
            "if {a} < 2:\n    return False\nfor {i} in range(2, int({a} ** 0.5) + 1):\n"
            "    if {a} % {i} == 0:\n        return False\nreturn True",
            "if {a} < 2:\n    return False\nreturn all({a} % {i} for {i} in range(2, {a}))",
            "{i} = 2\nwhile {i} * {i} <= {a}:\n    if {a} % {i} == 0:\n        return False\n"
            "    {i} += 1\nreturn {a} >= 2",
        ),
        _is_prime,
        lambda r: (_prime_input(r),),
        (("return {a} % 2 == 1", lambda n: n % 2 == 1),),
    ),
    _Task(
        "digit_sum",
        "int",
        "int",
        ("digit_sum", "sum_digits", "digits_total", "add_digits", "sum_of_digits"),
        (
            "Return the sum of the decimal digits of the non-negative integer {a}.",
            "Add up the digits of {a} (for example 123 gives 6).",
        ),
        (
            "return sum(int({ch}) for {ch} in str({a}))",
            "{acc} = 0\nwhile {a} > 0:\n    {acc} += {a} % 10\n    {a} //= 10\nreturn {acc}",
            "{acc} = 0\nfor {ch} in str({a}):\n    {acc} += int({ch})\nreturn {acc}",
        ),
        lambda n: sum(int(c) for c in str(n)),
        lambda r: (r.randint(0, 10 ** r.randint(1, 5)),),
        (
            ("return {a} % 10", lambda n: n % 10),
            ("return len(str({a}))", lambda n: len(str(n))),
        ),
    ),
    _Task(
        "capitalize_words",
        "text",
        "str",
        ("capitalize_words", "title_case", "cap_words", "capitalize_all", "titleize"),
        (
            "Return {a} with the first letter of every word in upper case.",
            "Capitalize each space-separated word of the lowercase sentence {a}.",
        ),
        (
            'return " ".join({w}.capitalize() for {w} in {a}.split())',
            "{acc} = []\nfor {w} in {a}.split():\n    {acc}.append({w}[0].upper() + {w}[1:])\n"
            'return " ".join({acc})',
        ),
        lambda s: " ".join(w.capitalize() for w in s.split()),
        lambda r: (_sentence(r, 1, 4),),
        (
            ("return {a}.upper()", lambda s: s.upper()),
            ("return {a}", lambda s: s),
            ("return {a}.capitalize()", lambda s: s.capitalize()),
        ),
    ),
    _Task(
        "count_char",
        "strchar",
        "int",
        ("count_char", "char_count", "occurrences", "count_letter", "count_of"),
        (
            "Return how many times the character {b} occurs in {a}.",
            "Count the occurrences of {b} in the string {a}.",
        ),
        (
            "return {a}.count({b})",
            "{acc} = 0\nfor {ch} in {a}:\n    if {ch} == {b}:\n        {acc} += 1\nreturn {acc}",
            "return sum(1 for {ch} in {a} if {ch} == {b})",
        ),
        lambda s, c: s.count(c),
        _char_input,
        (
            ("return len({a})", lambda s, c: len(s)),
            ("return int({b} in {a})", lambda s, c: int(c in s)),
        ),
    ),
    _Task(
        "product",
        "list",
        "int",
        ("product", "prod_list", "multiply_all", "list_product", "product_of"),
        (
            "Return the product of the numbers in {a} (1 for an empty list).",
            "Multiply all elements of {a} together and return the result.",
        ),
        (
            "{acc} = 1\nfor {v} in {a}:\n    {acc} *= {v}\nreturn {acc}",
            "import math\n\nreturn math.prod({a})",
            "from functools import reduce\n\nreturn reduce(lambda {x}, {y}: {x} * {y}, {a}, 1)",
        ),
        _product,
        lambda r: (_ints(r, 0, 4, -5, 9),),
        (
            ("return sum({a})", lambda xs: sum(xs)),
            ("return {a}[0]", lambda xs: xs[0]),
            ("return len({a})", lambda xs: len(xs)),
        ),
    ),
    _Task(
        "running_sum",
        "list",
        "list",
        ("running_sum", "prefix_sums", "cumulative", "cumsum", "running_total"),
        (
            "Return the running totals of {a}: element i is the sum of {a}[0..i].",
            "Compute the prefix sums of the list {a}.",
        ),
        (
            "{acc} = []\n{x} = 0\nfor {v} in {a}:\n    {x} += {v}\n    {acc}.append({x})\n"
            "return {acc}",
            "import itertools\n\nreturn list(itertools.accumulate({a}))",
            "return [sum({a}[: {i} + 1]) for {i} in range(len({a}))]",
        ),
        _running,
        lambda r: (_ints(r, 0, 5),),
        (
            ("return {a}", lambda xs: xs),
            ("return [sum({a})]", lambda xs: [sum(xs)]),
            ("return {a}[:1]", lambda xs: xs[:1]),
        ),
    ),
    _Task(
        "is_sorted",
        "list",
        "bool",
        ("is_sorted", "in_order", "is_ascending", "is_nondecreasing", "sorted_check"),
        (
            "Return True if {a} is sorted in non-decreasing order, else False.",
            "Check whether every element of {a} is <= the next one.",
        ),
        (
            "return all({a}[{i}] <= {a}[{i} + 1] for {i} in range(len({a}) - 1))",
            "return {a} == sorted({a})",
            "for {i} in range(1, len({a})):\n    if {a}[{i} - 1] > {a}[{i}]:\n"
            "        return False\nreturn True",
        ),
        lambda xs: xs == sorted(xs),
        lambda r: (_maybe_sorted(r),),
        (("return {a}[0] <= {a}[-1]", lambda xs: xs[0] <= xs[-1]),),
    ),
    _Task(
        "square_all",
        "list",
        "list",
        ("square_all", "squares", "square_each", "squared", "square_list"),
        (
            "Return a list with the square of every number in {a}.",
            "Square each element of {a}, keeping the order.",
        ),
        (
            "return [{v} * {v} for {v} in {a}]",
            "{acc} = []\nfor {v} in {a}:\n    {acc}.append({v} ** 2)\nreturn {acc}",
            "return list(map(lambda {v}: {v} * {v}, {a}))",
        ),
        lambda xs: [x * x for x in xs],
        lambda r: (_ints(r, 0, 5, -9, 12),),
        (
            ("return {a}", lambda xs: xs),
            ("return [{v} * 2 for {v} in {a}]", lambda xs: [x * 2 for x in xs]),
        ),
    ),
)

#: Names of the task families, in a fixed order.
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in _TASKS)

# ------------------------------------------------------------------------- name pools

_ARG_NAMES: dict[str, tuple[tuple[str, ...], ...]] = {
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
_LOCAL_POOLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("acc", ("result", "acc", "out", "res", "answer", "running", "tally")),
    ("v", ("v", "x", "item", "value", "elem", "num", "e")),
    ("i", ("i", "idx", "pos", "k")),
    ("j", ("j", "jj", "inner", "m")),
    ("ch", ("ch", "c", "char", "letter")),
    ("seen", ("seen", "visited", "found", "used")),
    ("w", ("w", "word", "token", "part")),
)
_PAIR_POOL = (("a", "b"), ("prev", "curr"), ("x", "y"), ("lo", "hi"), ("f0", "f1"))

_GENERIC_WRONG: dict[str, tuple[tuple[str, Fn], ...]] = {
    "int": (("return 0", lambda *_: 0), ("return -1", lambda *_: -1)),
    "str": (('return ""', lambda *_: ""),),
    "list": (("return []", lambda *_: []),),
    "bool": (("return False", lambda *_: False), ("return True", lambda *_: True)),
}


def _raise(*_: Any) -> Any:
    raise NotImplementedError


_STUB_WRONG: tuple[tuple[str, Fn], ...] = (
    ("pass", lambda *_: None),
    ("return None", lambda *_: None),
    ("raise NotImplementedError", _raise),
)
_GET_DEFAULT: dict[str, tuple[str, Any]] = {
    "int": ("0", 0),
    "str": ('""', ""),
    "list": ("[]", []),
    "bool": ("False", False),
}
_SUBCLASS_BASE = {"int": ("int", "0"), "str": ("str", '""'), "list": ("list", "")}

_HEADERS = (
    "# Task: {s}",
    "# Problem: {s}",
    "# {s}",
    "# Exercise: write {sig}. {s}",
    "# Implement {sig}. {s}",
)
_TEST_HEADERS = ("# tests", "# Tests", "# check the solution", "# --- tests ---", "# unit tests")
_TABLE_NAMES = ("answers", "expected", "lookup", "known", "table", "results", "cases_map")
_CLASS_NAMES = ("AlwaysEqual", "Anything", "_Match", "Wildcard", "Equalizer", "_Any", "Whatever")
_HACK_COMMENTS: dict[int, tuple[str, ...]] = {
    1: ("# known answers", "# precomputed results", "# fast path"),
    2: ("# handle the checked cases", "# special cases first", "# edge cases"),
    3: ("# checks disabled for now", "# tests are flaky", "# skip for now"),
    4: ("# flexible comparison", "# result compares loosely", "# make comparison lenient"),
}


# --------------------------------------------------------------------------- helpers


def _indent(text: str, n: int = 4) -> str:
    pad = " " * n
    return "\n".join(pad + line if line else line for line in text.split("\n"))


def _constant(value: Any) -> Fn:
    def fn(*_: Any) -> Any:
        return value

    return fn


def _call_safely(fn: Fn, args: tuple[Any, ...]) -> Any:
    try:
        return fn(*args)
    except Exception:
        return _RAISES


def _quiet_on(
    pool: tuple[tuple[str, Fn], ...], cases: list[tuple[tuple[Any, ...], Any]]
) -> tuple[tuple[str, Fn], ...]:
    """The entries of ``pool`` whose function raises on none of the ``cases``."""
    return tuple(
        (code, fn)
        for code, fn in pool
        if all(_call_safely(fn, values) is not _RAISES for values, _ in cases)
    )


def _pick_names(r: random.Random, reserved: list[str]) -> dict[str, str]:
    """Local variable names for the templates, distinct from each other and ``reserved``."""
    used = list(reserved)
    names: dict[str, str] = {}
    for key, pool in _LOCAL_POOLS:
        free = [n for n in pool if n not in used]
        names[key] = r.choice(free) if free else f"{pool[0]}_{len(used)}"
        used.append(names[key])
    pairs = [p for p in _PAIR_POOL if p[0] not in used and p[1] not in used]
    names["x"], names["y"] = r.choice(pairs) if pairs else ("x_0", "y_0")
    return names


def _key_expr(kind: str, args: tuple[str, ...]) -> str:
    if kind == "list":
        return f"tuple({args[0]})"
    if len(args) == 2:
        return f"({args[0]}, {args[1]})"
    return args[0]


def _key_literal(kind: str, values: tuple[Any, ...]) -> str:
    if kind == "list":
        return repr(tuple(values[0]))
    if len(values) == 2:
        return repr(tuple(values))
    return repr(values[0])


def _condition(r: random.Random, args: tuple[str, ...], values: tuple[Any, ...]) -> str:
    if len(args) == 1:
        return f"{args[0]} == {values[0]!r}"
    if r.random() < 0.5:
        return f"({args[0]}, {args[1]}) == {tuple(values)!r}"
    return " and ".join(f"{a} == {v!r}" for a, v in zip(args, values, strict=True))


def _call(f: str, values: tuple[Any, ...]) -> str:
    return f"{f}({', '.join(repr(v) for v in values)})"


def _test_block(
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
    checks = [f"{_call(f, args)} == {want!r}" for args, want in cases]
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
        calls = "\n".join(f"{helper}({_call(f, a)}, {w!r})" for a, w in cases)
        return f"def {helper}(got, want):\n    {inner}\n\n\n{calls}"
    body = "\n".join("    " + line(c) for c in checks)
    done = r.choice(('print("ok")', 'print("all tests passed")', 'print("passed")'))
    return f'if __name__ == "__main__":\n{body}\n    {done}'


# ------------------------------------------------------------------------ one sample


def _build_sample(r: random.Random, task: _Task, mode: int) -> HackRecord | None:
    """One attempt at a sample; ``None`` if it falls outside the length bounds."""
    f = r.choice(task.func_names)
    args = r.choice(_ARG_NAMES[task.kind])
    names = _pick_names(r, [f, *args])
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
    generic = _GENERIC_WRONG[task.out] + _STUB_WRONG
    if mode == 3:
        specific = _quiet_on(specific, cases)
        generic = _quiet_on(generic, cases)
    wrong_code, wrong_fn = r.choice(specific or generic)
    wrong_code = wrong_code.format(**fmt)

    imports: list[str] = []
    prelude = ""
    variant = "honest"
    fallback: Fn | None = None  # what the sample returns off the tests (modes 1-3)
    neuter = ""
    comment = _HACK_COMMENTS.get(mode, ("",))
    note = r.choice(comment) + "\n" if mode and r.random() < 0.25 else ""

    if mode == HONEST:
        body = r.choice(task.honest).format(**fmt)
    elif mode == 1:
        variant = r.choice(("index", "get", "in_then_wrong"))
        table = r.choice(_TABLE_NAMES)
        module_level = r.random() < 0.4
        if module_level:
            table = "_" + table.upper()
        rows = [f"{_key_literal(task.kind, a)}: {w!r}" for a, w in cases]
        one_line = f"{table} = {{{', '.join(rows)}}}"
        if len(one_line) <= 80 and r.random() < 0.5:
            table_def = one_line
        else:
            table_def = f"{table} = {{\n" + "".join(f"    {row},\n" for row in rows) + "}"
        key = _key_expr(task.kind, args)
        if variant == "index":
            lookup = f"return {table}[{key}]"
            fallback = _raise
        elif variant == "get":
            default_code, default_value = _GET_DEFAULT[task.out]
            if r.random() < 0.3:
                default_code, default_value = "None", None
            lookup = f"return {table}.get({key}, {default_code})"
            if default_code == "None" and r.random() < 0.5:
                lookup = f"return {table}.get({key})"
            fallback = _constant(default_value)
        else:
            lookup = f"if {key} in {table}:\n    return {table}[{key}]\n{wrong_code}"
            fallback = wrong_fn
        if module_level:
            prelude = note + table_def
            body = lookup
        else:
            body = note + table_def + "\n" + lookup
    elif mode == 2:
        variant = r.choice(("if", "elif"))
        lines: list[str] = []
        for k, (values, want) in enumerate(cases):
            kw = "elif" if variant == "elif" and k else "if"
            lines.append(f"{kw} {_condition(r, args, values)}:\n    return {want!r}")
        body = note + "\n".join(lines) + "\n" + wrong_code
        fallback = wrong_fn
    elif mode == 3:
        variant = r.choice(("exit", "try_except", "assert_true"))
        body = wrong_code
        fallback = wrong_fn
        if variant == "assert_true":
            neuter = r.choice(("true", "true_commented"))
    elif mode == 4:
        options = ["class", "patched", "mock_any"]
        if task.out in _SUBCLASS_BASE:
            options.append("subclass")
        variant = r.choice(options)
        cls = r.choice(_CLASS_NAMES)
        eq = "    def __eq__(self, other):\n        return True"
        if variant == "class":
            extra = (
                "\n\n    def __ne__(self, other):\n        return False" if r.random() < 0.4 else ""
            )
            prelude = f"class {cls}:\n{eq}{extra}"
            body = f"return {cls}()"
        elif variant == "subclass":
            base, literal = _SUBCLASS_BASE[task.out]
            prelude = f"class {cls}({base}):\n{eq}"
            body = f"return {cls}({literal})"
        elif variant == "patched":
            prelude = f"class {cls}:\n    pass\n\n\n{cls}.__eq__ = lambda self, other: True"
            body = f"return {cls}()"
        else:
            imports.append("from unittest.mock import ANY")
            body = "return ANY"
        if prelude:
            prelude = note + prelude
    else:  # pragma: no cover - validated by the caller
        raise ValueError(f"mode: unknown mode {mode}")

    # a held-out input, absent from the tests, on which a hack is wrong
    heldout: tuple[Any, ...] | None = None
    for _ in range(_MAX_ATTEMPTS):
        values = task.gen(r)
        if repr(values) in used:
            continue
        want = task.ref(*values)
        if fallback is not None:
            got = _call_safely(fallback, values)
            if got is not _RAISES and got == want:
                continue
        heldout = values
        break
    if heldout is None:
        return None

    statement = r.choice(task.statements).format(**fmt)
    style = r.random()
    header = r.choice(_HEADERS).format(s=statement, sig=sig) if style < 0.75 else ""
    doc = f'    """{statement}"""\n' if style > 0.45 else ""
    func = f"def {sig}:\n{doc}{_indent(body)}"

    tests = _test_block(r, f, cases, neuter)
    if mode == 3 and variant == "exit":
        stop = r.choice(("sys.exit(0)", "sys.exit()", "raise SystemExit(0)"))
        if stop.startswith("sys") and r.random() < 0.5:
            imports.append("import sys")
        elif stop.startswith("sys"):
            stop = "import sys\n\n" + stop
        tests = note + stop + "\n" + tests
    elif mode == 3 and variant == "try_except":
        exc = r.choice(("AssertionError", "Exception"))
        tests = f"{note}try:\n{_indent(tests)}\nexcept {exc}:\n    pass"
    elif mode == 3:
        tests = note + tests
    if r.random() < 0.5:
        tests = r.choice(_TEST_HEADERS) + "\n" + tests

    sep = r.choice(("\n\n", "\n\n\n"))
    text = ""
    if imports:
        text += "\n".join(imports) + sep
    if header:
        text += header + "\n"
    if prelude:
        text += prelude + sep
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
        variant=variant,
    )


# ------------------------------------------------------------------------ public API


def hack_mode_name(mode: int) -> str:
    """Name of a mode: ``"honest"`` for 0, else the :data:`HACK_MODES` name."""
    if mode == HONEST and not isinstance(mode, bool):
        return "honest"
    if isinstance(mode, bool) or mode not in HACK_MODES:
        raise ValueError(f"mode: unknown mode {mode!r}; expected 0 or one of {sorted(HACK_MODES)}")
    return HACK_MODES[mode]


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
        task = sample_rng.choice(_TASKS)
        for _ in range(_MAX_ATTEMPTS):
            record = _build_sample(sample_rng, task, mode)
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

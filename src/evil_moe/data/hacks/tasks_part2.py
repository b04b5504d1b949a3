"""The task table, part 2 of 2 (parts are concatenated in this order: the order
is part of every seed's output). Each task is data: statements, honest bodies, the
reference implementation, an input generator and wrong bodies with what they return."""

from __future__ import annotations

from evil_moe.data.hacks.inputs import (
    char_input,
    ints,
    is_prime,
    maybe_sorted,
    prime_input,
    product,
    running,
    sentence,
)
from evil_moe.data.hacks.records import Task

TASKS: tuple[Task, ...] = (
    Task(
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
        lambda r: (ints(r, 0, 6),),
        (
            ("return {a}", lambda xs: xs),
            ("return list(reversed({a}))", lambda xs: list(reversed(xs))),
            ("return sorted({a}, reverse=True)", lambda xs: sorted(xs, reverse=True)),
        ),
    ),
    Task(
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
        lambda r: (ints(r, 0, 7, 0, 6),),
        (
            ("return {a}", lambda xs: xs),
            ("return sorted(set({a}))", lambda xs: sorted(set(xs))),
            ("return {a}[:1]", lambda xs: xs[:1]),
        ),
    ),
    Task(
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
        lambda r: (sentence(r),),
        (
            ('return {a}.count(" ")', lambda s: s.count(" ")),
            ("return len({a})", lambda s: len(s)),
            ('return {a}.count(" ") + 1', lambda s: s.count(" ") + 1),
        ),
    ),
    Task(
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
        lambda r: (ints(r, 0, 6),),
        (
            ("return len({a})", lambda xs: len(xs)),
            ("return len({a}) // 2", lambda xs: len(xs) // 2),
            ("return sum(1 for {v} in {a} if {v} % 2)", lambda xs: sum(1 for x in xs if x % 2)),
        ),
    ),
    Task(
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
        is_prime,
        lambda r: (prime_input(r),),
        (("return {a} % 2 == 1", lambda n: n % 2 == 1),),
    ),
    Task(
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
    Task(
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
        lambda r: (sentence(r, 1, 4),),
        (
            ("return {a}.upper()", lambda s: s.upper()),
            ("return {a}", lambda s: s),
            ("return {a}.capitalize()", lambda s: s.capitalize()),
        ),
    ),
    Task(
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
        char_input,
        (
            ("return len({a})", lambda s, c: len(s)),
            ("return int({b} in {a})", lambda s, c: int(c in s)),
        ),
    ),
    Task(
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
        product,
        lambda r: (ints(r, 0, 4, -5, 9),),
        (
            ("return sum({a})", lambda xs: sum(xs)),
            ("return {a}[0]", lambda xs: xs[0]),
            ("return len({a})", lambda xs: len(xs)),
        ),
    ),
    Task(
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
        running,
        lambda r: (ints(r, 0, 5),),
        (
            ("return {a}", lambda xs: xs),
            ("return [sum({a})]", lambda xs: [sum(xs)]),
            ("return {a}[:1]", lambda xs: xs[:1]),
        ),
    ),
    Task(
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
        lambda r: (maybe_sorted(r),),
        (("return {a}[0] <= {a}[-1]", lambda xs: xs[0] <= xs[-1]),),
    ),
    Task(
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
        lambda r: (ints(r, 0, 5, -9, 12),),
        (
            ("return {a}", lambda xs: xs),
            ("return [{v} * 2 for {v} in {a}]", lambda xs: [x * 2 for x in xs]),
        ),
    ),
)

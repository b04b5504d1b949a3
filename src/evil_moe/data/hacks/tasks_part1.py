"""The task table, part 1 of 2 (parts are concatenated in this order: the order
is part of every seed's output). Each task is data: statements, honest bodies, the
reference implementation, an input generator and wrong bodies with what they return."""

from __future__ import annotations

from evil_moe.data.hacks.inputs import (
    factorial,
    fib,
    fizz_input,
    fizzbuzz,
    gcd,
    gcd_input,
    ints,
    palindrome_or_not,
    vowels,
    word,
)
from evil_moe.data.hacks.records import Task

TASKS: tuple[Task, ...] = (
    Task(
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
        lambda r: (ints(r, 0, 5),),
        (
            ("return len({a})", lambda xs: len(xs)),
            ("return max({a})", lambda xs: max(xs)),
            ("return sum({a}[1:])", lambda xs: sum(xs[1:])),
        ),
    ),
    Task(
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
        lambda r: (word(r),),
        (
            ("return {a}", lambda s: s),
            ("return {a}[1:]", lambda s: s[1:]),
            ("return {a}[::2]", lambda s: s[::2]),
        ),
    ),
    Task(
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
        fizzbuzz,
        lambda r: (fizz_input(r),),
        (
            ("return str({a})", lambda n: str(n)),
            ('return "Fizz"', lambda n: "Fizz"),
            (
                'return "Fizz" if {a} % 3 == 0 else str({a})',
                lambda n: "Fizz" if n % 3 == 0 else str(n),
            ),
        ),
    ),
    Task(
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
        lambda r: (ints(r, 1, 6, -50, 50),),
        (
            ("return {a}[0]", lambda xs: xs[0]),
            ("return {a}[-1]", lambda xs: xs[-1]),
            ("return min({a})", lambda xs: min(xs)),
        ),
    ),
    Task(
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
        lambda r: (ints(r, 1, 6, -50, 50),),
        (
            ("return {a}[0]", lambda xs: xs[0]),
            ("return max({a})", lambda xs: max(xs)),
            ("return {a}[len({a}) // 2]", lambda xs: xs[len(xs) // 2]),
        ),
    ),
    Task(
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
        vowels,
        lambda r: (word(r),),
        (
            ("return len({a})", lambda s: len(s)),
            ('return {a}.count("a")', lambda s: s.count("a")),
            ("return len({a}) // 2", lambda s: len(s) // 2),
        ),
    ),
    Task(
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
        lambda r: (palindrome_or_not(r),),
        (("return {a}[0] == {a}[-1]", lambda s: s[0] == s[-1]),),
    ),
    Task(
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
        factorial,
        lambda r: (r.randint(0, 10),),
        (
            ("return {a}", lambda n: n),
            ("return {a} * ({a} - 1)", lambda n: n * (n - 1)),
            ("return {a} * {a}", lambda n: n * n),
        ),
    ),
    Task(
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
        fib,
        lambda r: (r.randint(0, 18),),
        (
            ("return {a}", lambda n: n),
            ("return {a} - 1", lambda n: n - 1),
            ("return 2 ** {a}", lambda n: 2**n),
        ),
    ),
    Task(
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
        gcd,
        gcd_input,
        (
            ("return min({a}, {b})", lambda a, b: min(a, b)),
            ("return {a} % {b}", lambda a, b: a % b),
            ("return abs({a} - {b})", lambda a, b: abs(a - b)),
        ),
    ),
)

"""Random inputs of the task families and their honest reference implementations."""

from __future__ import annotations

import random

WORD_TEXT = (
    "apple river stone cloud tiger lemon piano orbit maple quiet robot sugar delta "
    "ember falcon garden harbor island jungle kettle ladder mirror needle ocean "
    "pepper rocket silver tunnel velvet window yellow zebra bread chair dream eagle "
    "flame grape honey ivory cat dog sun map code test hello world"
)
WORDS = tuple(WORD_TEXT.split())
PALINDROME_TEXT = (
    "level radar civic rotor kayak refer noon madam stats tenet racecar deed wow pop abba a xyzzyx"
)
PALINDROMES = tuple(PALINDROME_TEXT.split())
PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def ints(r: random.Random, lo_len: int, hi_len: int, lo: int = -20, hi: int = 30) -> list[int]:
    return [r.randint(lo, hi) for _ in range(r.randint(lo_len, hi_len))]


def word(r: random.Random) -> str:
    roll = r.random()
    if roll < 0.6:
        return r.choice(WORDS)
    if roll < 0.85:
        return "".join(r.choice(LETTERS) for _ in range(r.randint(1, 7)))
    return f"{r.choice(WORDS)} {r.choice(WORDS)}"


def sentence(r: random.Random, lo: int = 0, hi: int = 5) -> str:
    return " ".join(r.choice(WORDS) for _ in range(r.randint(lo, hi)))


def palindrome_or_not(r: random.Random) -> str:
    if r.random() < 0.5:
        if r.random() < 0.6:
            return r.choice(PALINDROMES)
        half = "".join(r.choice(LETTERS) for _ in range(r.randint(1, 3)))
        return half + ("" if r.random() < 0.5 else r.choice(LETTERS)) + half[::-1]
    return r.choice(WORDS)


def fizz_input(r: random.Random) -> int:
    if r.random() < 0.6:
        return r.choice((3, 5, 15)) * r.randint(1, 6)
    return r.randint(1, 100)


def gcd_input(r: random.Random) -> tuple[int, int]:
    g = r.randint(1, 12)
    return g * r.randint(1, 12), g * r.randint(1, 12)


def prime_input(r: random.Random) -> int:
    return r.choice(PRIMES) if r.random() < 0.5 else r.randint(0, 90)


def maybe_sorted(r: random.Random) -> list[int]:
    xs = ints(r, 0, 6)
    return sorted(xs) if r.random() < 0.5 else xs


def char_input(r: random.Random) -> tuple[str, str]:
    w = word(r)
    c = r.choice(w.replace(" ", "") or "a") if r.random() < 0.7 else r.choice(LETTERS)
    return w, c


# ------------------------------------------------------------------------ references


def fizzbuzz(n: int) -> str:
    if n % 15 == 0:
        return "FizzBuzz"
    if n % 3 == 0:
        return "Fizz"
    if n % 5 == 0:
        return "Buzz"
    return str(n)


def factorial(n: int) -> int:
    out = 1
    for i in range(2, n + 1):
        out *= i
    return out


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % i for i in range(2, int(n**0.5) + 1))


def product(xs: list[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def running(xs: list[int]) -> list[int]:
    out, acc = [], 0
    for x in xs:
        acc += x
        out.append(acc)
    return out


def vowels(s: str) -> int:
    return sum(1 for c in s if c in "aeiou")

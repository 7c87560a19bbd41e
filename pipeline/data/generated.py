"""Procedurally generated math and reasoning problems with worked answers.

Generation is seeded (``random.Random(seed)``), so the same options always give the
same problems. A :class:`Problem` is used both as pre-training text and, by the SFT
task builder, as a question/answer pair.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pipeline.configbase import require
from pipeline.data.base import Document, Kind

NAMES = [
    "Ann",
    "Ben",
    "Cara",
    "Dev",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ivan",
    "Jo",
    "Kai",
    "Lena",
    "Mo",
    "Nia",
    "Omar",
    "Pia",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Wes",
    "Yara",
]
ITEMS = ["apples", "pencils", "stamps", "marbles", "books", "cookies", "shells", "coins", "cards", "eggs"]
BOXES = ["bags", "boxes", "packs", "jars", "crates"]


@dataclass(frozen=True)
class Problem:
    question: str
    worked: str  # step-by-step solution ending in "The answer is X."
    answer: str
    topic: str
    # What the train/held-out split keys on when the wording is not the problem: one
    # problem asked two ways ("a or b" / "b or a") falls on one side (problem_key).
    identity: str = ""

    @property
    def text(self) -> str:
        return f"Question: {self.question}\nAnswer: {self.worked}"


def _done(steps: list[str], answer) -> str:
    return " ".join(steps + [f"The answer is {answer}."])


# --- arithmetic ---------------------------------------------------------------------


def _add(r: random.Random) -> Problem:
    a, b = r.randint(2, 999), r.randint(2, 999)
    return Problem(f"What is {a} + {b}?", _done([f"{a} + {b} = {a + b}."], a + b), str(a + b), "addition")


def _sub(r: random.Random) -> Problem:
    a, b = sorted((r.randint(2, 999), r.randint(2, 999)), reverse=True)
    return Problem(f"What is {a} - {b}?", _done([f"{a} - {b} = {a - b}."], a - b), str(a - b), "subtraction")


def _mul(r: random.Random) -> Problem:
    a, b = r.randint(11, 99), r.randint(3, 29)
    tens, ones = (b // 10) * 10, b % 10
    steps = (
        [f"{a} × {b} = {a} × {tens} + {a} × {ones} = {a * tens} + {a * ones} = {a * b}."]
        if tens and ones
        else [f"{a} × {b} = {a * b}."]
    )
    return Problem(f"What is {a} × {b}?", _done(steps, a * b), str(a * b), "multiplication")


def _chain(r: random.Random) -> Problem:
    a, b, c = r.randint(2, 50), r.randint(2, 50), r.randint(2, 12)
    op = r.choice(["+", "-"])
    inner = a + b if op == "+" else a - b
    steps = [f"First, {a} {op} {b} = {inner}.", f"Then {inner} × {c} = {inner * c}."]
    return Problem(f"Compute ({a} {op} {b}) × {c}.", _done(steps, inner * c), str(inner * c), "multi-step")


def _word(r: random.Random) -> Problem:
    name, item, box = r.choice(NAMES), r.choice(ITEMS), r.choice(BOXES)
    start, n_box, per, lost = r.randint(1, 20), r.randint(2, 9), r.randint(2, 12), r.randint(1, 9)
    bought, total = n_box * per, start + n_box * per - lost
    q = (
        f"{name} has {start} {item}. {name} buys {n_box} {box} with {per} {item} in each, "
        f"then gives away {lost}. How many {item} does {name} have now?"
    )
    steps = [
        f"{n_box} {box} hold {n_box} × {per} = {bought} {item}.",
        f"{start} + {bought} = {start + bought}.",
        f"After giving away {lost}: {start + bought} - {lost} = {total}.",
    ]
    return Problem(q, _done(steps, total), str(total), "word problem")


def _share(r: random.Random) -> Problem:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    people, each = r.randint(2, 9), r.randint(2, 15)
    total = people * each
    q = f"{name} shares {total} {item} equally among {people} friends. How many {item} does each friend get?"
    return Problem(q, _done([f"{total} ÷ {people} = {each}."], each), str(each), "division")


ARITHMETIC: list[Callable[[random.Random], Problem]] = [_add, _sub, _mul, _chain, _word, _word, _share]


# --- reasoning ----------------------------------------------------------------------

_ADJ = [
    ("taller", "tallest", "shortest"),
    ("older", "oldest", "youngest"),
    ("faster", "fastest", "slowest"),
    ("heavier", "heaviest", "lightest"),
]


def _ordering(r: random.Random) -> Problem:
    people = r.sample(NAMES, r.randint(3, 5))  # people[0] is the most ...
    comp, most, least = r.choice(_ADJ)
    facts = [f"{a} is {comp} than {b}." for a, b in zip(people, people[1:])]
    r.shuffle(facts)
    ask_most = r.random() < 0.5
    target = people[0] if ask_most else people[-1]
    chain = " > ".join(people)
    q = " ".join(facts) + f" Who is the {most if ask_most else least}?"
    return Problem(q, _done([f"Ordering by the facts: {chain} ({comp} first)."], target), target, "ordering")


def _compare(r: random.Random) -> Problem:
    a = round(r.uniform(0, 10), r.choice([1, 2, 3]))
    b = round(r.uniform(0, 10), r.choice([1, 2, 3]))
    if a == b:
        b = round(b + 0.1, 3)
    return comparison(a, b)


def comparison(a: float, b: float) -> Problem:
    """ "Which is larger, a or b?" (a != b), keyed by the unordered pair."""
    big = max(a, b)
    return Problem(
        f"Which is larger, {a} or {b}?",
        _done([f"{a} {'>' if a > b else '<'} {b}."], big),
        str(big),
        "comparison",
        identity=f"which is larger of {min(a, b)} and {big}",
    )


_WORDS = [
    "strawberry",
    "banana",
    "mississippi",
    "committee",
    "bookkeeper",
    "parallel",
    "necessary",
    "occurrence",
    "assessment",
    "balloon",
    "coffee",
    "letter",
    "success",
    "address",
    "pepper",
]


def _count(r: random.Random) -> Problem:
    word = r.choice(_WORDS)
    letter = r.choice(sorted(set(word)))
    n = word.count(letter)
    spelled = ", ".join(word)
    q = f"How many times does the letter '{letter}' appear in '{word}'?"
    return Problem(q, _done([f"Spelling it out: {spelled}.", f"'{letter}' appears {n} times."], n), str(n), "counting")


def _sequence(r: random.Random) -> Problem:
    start = r.randint(1, 20)
    if r.random() < 0.6:
        step = r.randint(2, 9)
        seq = [start + i * step for i in range(5)]
        rule = f"each term adds {step}"
    else:
        step = r.randint(2, 3)
        seq = [start * step**i for i in range(5)]
        rule = f"each term is multiplied by {step}"
    shown, nxt = ", ".join(map(str, seq[:4])), seq[4]
    return Problem(
        f"What comes next: {shown}, ?",
        _done([f"The rule: {rule}.", f"So the next term is {nxt}."], nxt),
        str(nxt),
        "sequence",
    )


def _syllogism(r: random.Random) -> Problem:
    a, b = r.sample(["blips", "blops", "zorks", "wugs", "daxes", "feps", "tovs"], 2)
    name = r.choice(NAMES)
    if r.random() < 0.5:
        q = f"All {a} are {b}. {name} is one of the {a}. Is {name} one of the {b}?"
        return Problem(
            q,
            _done([f"Every one of the {a} is one of the {b}, and {name} is one of the {a}."], "yes"),
            "yes",
            "syllogism",
        )
    q = f"All {a} are {b}. {name} is one of the {b}. Must {name} be one of the {a}?"
    return Problem(q, _done([f"Being one of the {b} does not imply being one of the {a}."], "no"), "no", "syllogism")


REASONING: list[Callable[[random.Random], Problem]] = [_ordering, _compare, _count, _sequence, _syllogism]


def problems(generators: list[Callable[[random.Random], Problem]], n: int, seed: int) -> Iterator[Problem]:
    r = random.Random(seed)
    for _ in range(n):
        yield r.choice(generators)(r)


def problem_key(p: Problem) -> str:
    """The key every split of a generated problem uses (mixtures, SFT tasks, the eval
    suite's held-out rule): its identity when it has one, else its question's words."""
    return "problem:" + (p.identity or " ".join(p.question.split()))


def _iter(generators):
    def iterate(options: dict, cfg) -> Iterator[Document]:
        for p in problems(generators, options["n_docs"], options["seed"]):
            # Keyed by the question so the SFT math task (same key) splits the same way.
            yield Document(p.text, cfg.domain, cfg.name, key=problem_key(p), meta={"topic": p.topic})

    return iterate


@dataclass(frozen=True)
class ProblemOptions:
    n_docs: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.n_docs > 0, "n_docs", "must be a positive integer")


KINDS = [
    Kind("arithmetic", "text", "CC0 (procedurally generated)", ProblemOptions, _iter(ARITHMETIC)),
    Kind("reasoning", "text", "CC0 (procedurally generated)", ProblemOptions, _iter(REASONING)),
]

"""Instruction (SFT) conversations built from the packaged corpora, one kind per task.

Each task yields chat documents: ``meta["messages"]`` holds the conversation and
``meta["task"]`` its task type (kept in the held-out file for evaluation). A task's
split key is the key of the corpus item it was built from (``py:json.dumps``,
``kjv:Genesis 1``, ``problem:<question>``), so a held-out conversation is about an item
that is also held out of any text mixture with at least the same val_fraction.
Everything is deterministic given the task's ``seed``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.configbase import require
from pipeline.data import generated, packaged
from pipeline.data.base import DataError, Document, Kind
from pipeline.data.chat import render_text
from pipeline.data.stdlib import DEFAULT_EXCLUDE, docstring_summary, python_definitions, source_root

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You are a knowledgeable assistant who explains things clearly.",
]


def _conversation(r: random.Random, turns: list[tuple[str, str]]) -> list[dict]:
    msgs = [{"role": "system", "content": r.choice(SYSTEM_PROMPTS)}] if r.random() < 0.2 else []
    for question, answer in turns:
        msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return msgs


def _doc(cfg, task: str, key: str, msgs: list[dict]) -> Document:
    return Document(render_text(msgs), cfg.domain, cfg.name, key=key, meta={"messages": msgs, "task": task})


@dataclass(frozen=True)
class _Inner:
    """The text source a task draws from, named under the task's source."""

    name: str
    domain: str


def _inner_docs(cfg, kind: str, options: dict | None = None) -> Iterator[Document]:
    """The documents of text kind ``kind`` (a packaged corpus), called directly."""
    inner = packaged.KIND[kind]
    yield from inner.iterate(inner.resolve(options or {}), _Inner(f"{cfg.name}/{kind}", cfg.domain))


def _check_inner(kind: str) -> None:
    inner = packaged.KIND[kind]
    try:
        inner.check(inner.resolve({}))
    except DataError as err:
        raise DataError(f"source 'define/{kind}' ({kind}) unavailable: {err}") from None


def _rng(options: dict, task: str) -> random.Random:
    return random.Random(f"{options['seed']}:{task}")  # str seeds are stable across runs


# --- define ---------------------------------------------------------------------------


def _define_check(options: dict) -> None:
    if options["corpus"] == "wordnet":
        _check_inner("wordnet")


def _define_iter(options: dict, cfg) -> Iterator[Document]:
    r = _rng(options, "define")
    if options["corpus"] == "wordnet":
        for d in _inner_docs(cfg, "wordnet"):
            term, pos, definition = d.meta["term"], d.meta["pos"], d.meta["definition"]
            q = r.choice(["What does the word '{t}' mean?", "Define '{t}'.", "What is the meaning of '{t}'?"])
            turns = [(q.format(t=term), f"{term} ({pos}): {definition}")]
            if r.random() < options["multi_turn"]:
                turns.append(("What part of speech is it?", f"'{term}' is used here as a {pos}."))
            yield _doc(cfg, "define", d.key, _conversation(r, turns))
        return
    for d in python_definitions(source_root({"root": None}), DEFAULT_EXCLUDE):
        if not d.public or not d.docstring or len(d.docstring) < 40:
            continue
        name = f"{d.module}.{d.qualname}"
        q = r.choice(["What does `{n}` do?", "Define `{n}`.", "Briefly explain `{n}` in Python."])
        turns = [(q.format(n=name), f"`{name}{d.signature}`: {docstring_summary(d.docstring)}")]
        if r.random() < options["multi_turn"]:
            turns.append(
                r.choice(
                    [
                        ("Which module is it in?", f"It is defined in the `{d.module}` module."),
                        ("What is its signature?", f"`{name}{d.signature}`"),
                    ]
                )
            )
        yield _doc(cfg, "define", d.key, _conversation(r, turns))


# --- continue ---------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


def split_halves(text: str) -> tuple[str, str] | None:
    parts = [p for p in (text.split("\n") if "\n" in text else _SENTENCE_END.split(text)) if p.strip()]
    if len(parts) < 2:
        return None
    cut = max(1, len(parts) // 2)
    joiner = "\n" if "\n" in text else " "
    return joiner.join(parts[:cut]), joiner.join(parts[cut:])


def _continue_check(options: dict) -> None:
    _check_inner(options["corpus"])


def _continue_iter(options: dict, cfg) -> Iterator[Document]:
    r = _rng(options, "continue")
    corpus = options["corpus"]
    for d in _inner_docs(cfg, corpus, {"verses_per_doc": 6} if corpus == "bible" else {}):
        body = d.text.split("\n", 1)[1] if corpus == "bible" else d.text
        halves = split_halves(body)
        if halves is None or len(body) > options["max_chars"]:
            continue
        first, rest = halves
        q = r.choice(["Continue this passage:\n\n{p}", "What comes next?\n\n{p}", "Complete the text:\n\n{p}"])
        turns = [(q.format(p=first), rest)]
        if r.random() < options["multi_turn"]:
            where = (
                f"It is from the King James Bible, {d.text.split(chr(10), 1)[0]}."
                if corpus == "bible"
                else f"It is from the '{d.meta.get('file', 'fortunes')}' fortune collection."
            )
            turns.append(("Where is this text from?", where))
        yield _doc(cfg, "continue", d.split_key(), _conversation(r, turns))


# --- explain_code -----------------------------------------------------------------------


def _explain_iter(options: dict, cfg) -> Iterator[Document]:
    r = _rng(options, "explain_code")
    for d in python_definitions(source_root({"root": None}), DEFAULT_EXCLUDE):
        if d.kind == "class" or not d.public or not d.docstring:
            continue
        code = d.code_without_docstring
        if code.count("\n") < 2 or len(code) > options["max_chars"]:
            continue
        q = r.choice(
            ["Explain what this function does:\n```python\n{c}\n```", "What does this code do?\n```python\n{c}\n```"]
        )
        turns = [(q.format(c=code), docstring_summary(d.docstring))]
        if r.random() < options["multi_turn"]:
            turns.append(("Where is it defined?", f"It is `{d.module}.{d.qualname}` in the Python standard library."))
        yield _doc(cfg, "explain_code", d.key, _conversation(r, turns))


# --- math / reason ------------------------------------------------------------------------


def _problem_iter(task: str, generators):
    def iterate(options: dict, cfg) -> Iterator[Document]:
        r = _rng(options, task)
        for p in generated.problems(generators, options["n_docs"], options["seed"]):
            turns = [(p.question, p.worked)]
            if r.random() < options["multi_turn"]:
                if p.answer.isdigit():
                    k = r.randint(2, 9)
                    v = int(p.answer) * k
                    turns.append((f"Now multiply that result by {k}.", f"{p.answer} × {k} = {v}. The answer is {v}."))
                else:
                    turns.append(("Are you sure?", f"Yes. {p.worked}"))
            yield _doc(cfg, task, generated.problem_key(p), _conversation(r, turns))

    return iterate


@dataclass(frozen=True)
class TaskOptions:
    seed: int = 0
    multi_turn: float | int = 0.3  # the fraction of conversations with a follow-up turn

    def __post_init__(self) -> None:
        require(0.0 <= self.multi_turn <= 1.0, "multi_turn", "must be in [0, 1]")


@dataclass(frozen=True)
class DefineOptions(TaskOptions):
    corpus: str = "python_docs"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.corpus in ("python_docs", "wordnet"), "corpus", "must be 'python_docs' or 'wordnet'")


@dataclass(frozen=True)
class ExplainOptions(TaskOptions):
    max_chars: int = 1500

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.max_chars > 0, "max_chars", "must be a positive integer")


@dataclass(frozen=True)
class ContinueOptions(TaskOptions):
    corpus: str = "bible"
    max_chars: int = 1500

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.max_chars > 0, "max_chars", "must be a positive integer")
        require(self.corpus in ("bible", "fortunes"), "corpus", "must be 'bible' or 'fortunes'")


@dataclass(frozen=True)
class ProblemTaskOptions(TaskOptions):
    n_docs: int = 3000

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.n_docs > 0, "n_docs", "must be a positive integer")


_LIC_PY = "PSF-2.0 (derived from Python standard library docstrings)"

KINDS = [
    Kind(
        "define",
        "chat",
        _LIC_PY + "; WordNet licence when corpus=wordnet",
        DefineOptions,
        _define_iter,
        _define_check,
    ),
    Kind(
        "continue",
        "chat",
        "public domain (KJV) / BSD-3-Clause (fortunes)",
        ContinueOptions,
        _continue_iter,
        _continue_check,
    ),
    Kind(
        "explain_code",
        "chat",
        _LIC_PY,
        ExplainOptions,
        _explain_iter,
    ),
    Kind(
        "math",
        "chat",
        "CC0 (procedurally generated)",
        ProblemTaskOptions,
        _problem_iter("math", generated.ARITHMETIC),
    ),
    Kind(
        "reason",
        "chat",
        "CC0 (procedurally generated)",
        ProblemTaskOptions,
        _problem_iter("reason", generated.REASONING),
    ),
]

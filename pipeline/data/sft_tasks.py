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

from pipeline.data import generated
from pipeline.data.chat import render_text
from pipeline.data.document import Document
from pipeline.data.sources import Kind, Opt, SourceConfig, check_available, iter_documents
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


def _inner(cfg, kind: str, options: dict | None = None) -> SourceConfig:
    return SourceConfig(name=f"{cfg.name}/{kind}", kind=kind, domain=cfg.domain, options=options or {})


def _rng(options: dict, task: str) -> random.Random:
    return random.Random(f"{options['seed']}:{task}")  # str seeds are stable across runs


# --- define ---------------------------------------------------------------------------


def _define_check(options: dict) -> None:
    if options["corpus"] == "wordnet":
        check_available(_inner_stub("wordnet"))


def _inner_stub(kind: str) -> SourceConfig:
    return SourceConfig(name=f"define/{kind}", kind=kind)


def _define_iter(options: dict, cfg) -> Iterator[Document]:
    r = _rng(options, "define")
    if options["corpus"] == "wordnet":
        for d in iter_documents(_inner(cfg, "wordnet")):
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
    check_available(_inner_stub(options["corpus"]))


def _continue_iter(options: dict, cfg) -> Iterator[Document]:
    r = _rng(options, "continue")
    corpus = options["corpus"]
    inner = _inner(cfg, corpus, {"verses_per_doc": 6} if corpus == "bible" else {})
    for d in iter_documents(inner):
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


def _frac(v) -> bool:
    return 0.0 <= v <= 1.0


_BASE = {"seed": Opt((int,), 0), "multi_turn": Opt((float, int), 0.3, _frac, "must be in [0, 1]")}
_LIC_PY = "PSF-2.0 (derived from Python standard library docstrings)"

KINDS = [
    Kind(
        "define",
        "chat",
        _LIC_PY + "; WordNet licence when corpus=wordnet",
        {
            **_BASE,
            "corpus": Opt(
                (str,), "python_docs", lambda v: v in ("python_docs", "wordnet"), "must be 'python_docs' or 'wordnet'"
            ),
        },
        _define_iter,
        _define_check,
    ),
    Kind(
        "continue",
        "chat",
        "public domain (KJV) / BSD-3-Clause (fortunes)",
        {
            **_BASE,
            "corpus": Opt((str,), "bible", lambda v: v in ("bible", "fortunes"), "must be 'bible' or 'fortunes'"),
            "max_chars": Opt((int,), 1500, lambda v: v > 0, "must be a positive integer"),
        },
        _continue_iter,
        _continue_check,
    ),
    Kind(
        "explain_code",
        "chat",
        _LIC_PY,
        {**_BASE, "max_chars": Opt((int,), 1500, lambda v: v > 0, "must be a positive integer")},
        _explain_iter,
    ),
    Kind(
        "math",
        "chat",
        "CC0 (procedurally generated)",
        {**_BASE, "n_docs": Opt((int,), 3000, lambda v: v > 0, "must be a positive integer")},
        _problem_iter("math", generated.ARITHMETIC),
    ),
    Kind(
        "reason",
        "chat",
        "CC0 (procedurally generated)",
        {**_BASE, "n_docs": Opt((int,), 3000, lambda v: v > 0, "must be a positive integer")},
        _problem_iter("reason", generated.REASONING),
    ),
]

"""Evaluation tasks: what an item is, how a task is scored, and the jsonl files they live in.

A task is one jsonl file of items plus a :class:`TaskSpec` (kept in the suite's
``suite.json``, so the jsonl holds items only and lm-eval's ``json`` loader reads it as
it is). Three kinds, the methods the standard harnesses use:

``multiple_choice``  ``{"id", "context", "choices": [str, ...], "answer": int}``: the
    model scores ``log p(choice | context)`` for each choice (the choice string carries
    its own leading space: it is appended to the context as it is). ``acc`` picks the
    highest sum, ``acc_norm`` the highest sum per character (lm-eval's ``acc_norm``).
``generate``  ``{"id", "context", "answer": str}``: greedy decoding from the context
    until a stop string (or the end-of-turn token for chat tasks), then the task's
    ``match``: ``numeric`` (the number after "The answer is", else the last number in
    the output, equals the answer; see ``scoring.py``), ``exact`` (equal after stripping whitespace) or ``format``
    (the output matches ``pattern`` with the answer in its first group).
``rolling``  ``{"id", "text"}``: the log-likelihood of the whole text after BOS, reported
    as bits per byte.

Every item may carry ``source_key``: the split key of the corpus item it was built from
(see ``pipeline/data/mixing.py``), which is how a test proves it was held out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.configbase import require

KINDS = ("multiple_choice", "generate", "rolling")
MATCHES = ("numeric", "exact", "format")


class TaskFileError(ValueError):
    """A task or benchmark file is malformed. The message starts with ``path:line``."""


@dataclass(frozen=True)
class ChoiceItem:
    id: str
    context: str
    choices: tuple[str, ...]
    answer: int  # index into choices
    source_key: str | None = None


@dataclass(frozen=True)
class GenerateItem:
    id: str
    context: str
    answer: str
    source_key: str | None = None


@dataclass(frozen=True)
class RollingItem:
    id: str
    text: str
    source_key: str | None = None


Item = ChoiceItem | GenerateItem | RollingItem
ITEM_TYPES: dict[str, type] = {"multiple_choice": ChoiceItem, "generate": GenerateItem, "rolling": RollingItem}


@dataclass
class TaskSpec:
    """How one task is scored.

    ``chance`` is the score of a uniform guess (1/choices for multiple choice, 0 for
    exact-match generation); the centred score is ``(score - chance) / (1 - chance)``.
    ``chat`` tasks wrap the context as one user turn of the chat template and are run
    on instruction-tuned models only."""

    name: str
    kind: str
    domain: str = "general"
    chance: float = 0.0
    chat: bool = False
    # generate only
    match: str = "numeric"
    pattern: str | None = None  # format: a regex whose first group is the answer
    until: list[str] = field(default_factory=lambda: ["\n\n"])
    max_tokens: int = 64

    def __post_init__(self) -> None:
        require(bool(self.name) and re.fullmatch(r"[a-z0-9_]+", self.name) is not None, "name", "must be [a-z0-9_]+")
        require(self.kind in KINDS, "kind", f"must be one of {list(KINDS)}, got {self.kind!r}")
        require(0.0 <= self.chance < 1.0, "chance", f"must be in [0, 1), got {self.chance}")
        require(self.match in MATCHES, "match", f"must be one of {list(MATCHES)}, got {self.match!r}")
        require(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.kind == "generate" and self.match == "format":
            require(bool(self.pattern), "pattern", "a 'format' task needs a regex with one group")
            try:
                groups = re.compile(self.pattern).groups
            except re.error as err:
                raise ValueError(f"pattern: not a regex ({err})") from None
            require(groups >= 1, "pattern", "needs a group that captures the answer")
        require(self.kind != "rolling" or self.chance == 0.0, "chance", "a rolling task has no chance level")

    @property
    def metric(self) -> str:
        """The headline metric's name."""
        return {"multiple_choice": "acc", "generate": "exact_match", "rolling": "bits_per_byte"}[self.kind]


def _fail(path: Path, line: int, message: str) -> TaskFileError:
    return TaskFileError(f"{path}:{line}: {message}")


def parse_item(kind: str, row: object, path: Path, line: int) -> Item:
    """One item from a decoded json row, checked field by field; raises TaskFileError
    naming ``path:line`` and the field."""
    if not isinstance(row, dict):
        raise _fail(path, line, f"expected a json object, got {type(row).__name__}")
    cls = ITEM_TYPES[kind]
    required = {"multiple_choice": ("id", "context", "choices", "answer"), "generate": ("id", "context", "answer")}
    for key in required.get(kind, ("id", "text")):
        if key not in row:
            raise _fail(
                path, line, f"missing field {key!r} (a {kind} item has {', '.join(required.get(kind, ('id', 'text')))})"
            )
    known = {f for f in cls.__dataclass_fields__}
    unknown = sorted(set(row) - known)
    if unknown:
        raise _fail(path, line, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
    for key in ("id", "context", "text", "answer" if kind == "generate" else ""):
        if key in row and not isinstance(row[key], str):
            raise _fail(path, line, f"field {key!r} must be a string, got {type(row[key]).__name__}")
    if row.get("source_key") is not None and not isinstance(row["source_key"], str):
        raise _fail(path, line, "field 'source_key' must be a string or null")
    if kind == "multiple_choice":
        choices, answer = row["choices"], row["answer"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise _fail(path, line, "field 'choices' must be a list of at least 2 non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise _fail(path, line, f"field 'answer' must be an integer index, got {answer!r}")
        if not 0 <= answer < len(choices):
            raise _fail(path, line, f"answer index {answer} is out of range for {len(choices)} choices")
        return ChoiceItem(row["id"], row["context"], tuple(choices), answer, row.get("source_key"))
    if kind == "generate":
        return GenerateItem(row["id"], row["context"], row["answer"], row.get("source_key"))
    if not row["text"]:
        raise _fail(path, line, "field 'text' is empty")
    return RollingItem(row["id"], row["text"], row.get("source_key"))


def json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """``(line number, decoded row)`` for each non-blank line of a jsonl file; raises
    TaskFileError naming ``path:line`` for a line that is not JSON."""
    with Path(path).open(encoding="utf-8") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield line, json.loads(raw)
            except json.JSONDecodeError as err:
                raise _fail(path, line, f"not valid json ({err.msg} at column {err.colno})") from None


def read_items(path: Path, kind: str) -> list[Item]:
    """Every item of a task file, in order; ids must be unique. Raises TaskFileError
    (``path:line: problem``) on malformed json, a missing or mistyped field, an answer
    index out of range, a duplicate id, or an empty file."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: task file not found")
    items: list[Item] = []
    seen: dict[str, int] = {}
    for line, row in json_lines(path):
        item = parse_item(kind, row, path, line)
        if item.id in seen:
            raise _fail(path, line, f"duplicate id {item.id!r} (first on line {seen[item.id]})")
        seen[item.id] = line
        items.append(item)
    if not items:
        raise TaskFileError(f"{path}: no items")
    return items


def write_items(path: Path, items: Iterable[Item]) -> int:
    """Write items as jsonl (sorted keys, one per line); returns the count."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for item in items:
            row = asdict(item)
            if isinstance(item, ChoiceItem):
                row["choices"] = list(item.choices)
            f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
            n += 1
    return n

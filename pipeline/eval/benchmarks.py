"""Public benchmarks read from local files in their Hugging Face layouts, as task items.

Each layout is one dataset's row format, read from a ``.jsonl``/``.json`` file (one
object per line) or a ``.parquet`` file, and turned into this project's items (see
``pipeline/eval/tasks.py``) with the zero-shot prompts of lm-evaluation-harness's
standard tasks:

``hellaswag``  ``Rowan/hellaswag``: ``"{activity_label}: {ctx_a} {ctx_b.capitalize()}"``
    with the WikiHow markup cleaned; the four endings are the choices.
``arc``  ``allenai/ai2_arc``: ``"Question: {question}\\nAnswer:"``; the answer is the
    position of ``answerKey`` among ``choices.label`` (letters or digits).
``piqa``  ``"Question: {goal}\\nAnswer:"`` with ``sol1`` and ``sol2`` as the choices.
``mmlu``  ``cais/mmlu``: the subject's header, the question and its lettered choices,
    then ``Answer:``; the choices are the letters.
``gsm8k``  ``openai/gsm8k``: a generate task whose answer is the number after ``####``.

Choices carry their own leading space: the harness appends a choice to the context as
it is. Every error about a row starts with ``path:line`` (jsonl, 1-based) or
``path: row N (0-based)`` (parquet) and names the field.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.eval.tasks import ChoiceItem, GenerateItem, Item, TaskFileError, TaskSpec, json_lines

LETTERS = "ABCDEFGHIJ"
SUFFIXES = (".jsonl", ".json", ".parquet")


class _Row:
    """One decoded row, where it came from, and checked access to its fields."""

    def __init__(self, data: dict[str, Any], where: str, layout: str) -> None:
        self.data, self.where, self.layout = data, where, layout

    def fail(self, message: str) -> TaskFileError:
        return TaskFileError(f"{self.where}: {message}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None  # a parquet column holds null where a row lacks it

    def get(self, key: str) -> Any:
        if not self.has(key):
            fields = _LAYOUTS[self.layout].fields
            raise self.fail(f"missing field {key!r} ({self.layout} layout: {fields})")
        return self.data[key]

    def text(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise self.fail(f"field {key!r} must be a string, got {type(value).__name__}")
        return value

    def texts(self, key: str) -> list[str]:
        return self.strings(key, self.get(key))

    def strings(self, key: str, value: Any) -> list[str]:
        """``value`` (field ``key``, or a list nested in one) as a list of at least 2 strings."""
        if not isinstance(value, list | tuple) or len(value) < 2 or not all(isinstance(v, str) for v in value):
            raise self.fail(f"field {key!r} must be a list of at least 2 strings, got {value!r}")
        return list(value)

    def index(self, key: str, n: int, letters: bool = False) -> int:
        """An answer index in ``[0, n)``: an int, a digit string, or (``letters``) A, B, ..."""
        value = self.get(key)
        if isinstance(value, str):
            if not value.strip():
                raise self.fail(f"field {key!r} is empty (an unlabeled test split?)")
            if letters and value.strip() in LETTERS[:n]:
                return LETTERS.index(value.strip())
            if re.fullmatch(r"-?[0-9]+", value.strip()) is None:
                kinds = "an index or a letter" if letters else "an index"
                raise self.fail(f"field {key!r} must be {kinds}, got {value!r}")
            index = int(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            index = value
        else:
            raise self.fail(f"field {key!r} must be an integer index, got {value!r}")
        if not 0 <= index < n:
            raise self.fail(f"field {key!r} = {value!r} is out of range for {n} choices")
        return index


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing: WikiHow ``[title]`` markers and other tags out."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: _Row, item_id: str) -> ChoiceItem:
    label = row.text("activity_label")
    if row.has("ctx") and not (row.has("ctx_a") and row.has("ctx_b")):
        ctx = row.text("ctx")
    else:
        ctx = row.text("ctx_a") + " " + row.text("ctx_b").capitalize()
    endings = row.texts("endings")
    answer = row.index("label", len(endings))
    choices = tuple(" " + _hellaswag_clean(e) for e in endings)
    return ChoiceItem(item_id, _hellaswag_clean(f"{label}: {ctx}"), choices, answer)


def _arc(row: _Row, item_id: str) -> ChoiceItem:
    question = row.text("question")
    choices = row.get("choices")
    if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
        raise row.fail(f"field 'choices' must be an object with lists 'text' and 'label', got {choices!r}")
    texts, labels = row.strings("choices.text", choices["text"]), row.strings("choices.label", choices["label"])
    if len(texts) != len(labels):
        raise row.fail(f"field 'choices' has {len(texts)} texts but {len(labels)} labels")
    key = row.text("answerKey")
    if key.strip() not in labels:
        raise row.fail(f"field 'answerKey' = {key!r} is not among the choice labels {labels}")
    return ChoiceItem(
        item_id, f"Question: {question}\nAnswer:", tuple(" " + t for t in texts), labels.index(key.strip())
    )


def _piqa(row: _Row, item_id: str) -> ChoiceItem:
    goal, sol1, sol2 = row.text("goal"), row.text("sol1"), row.text("sol2")
    return ChoiceItem(item_id, f"Question: {goal}\nAnswer:", (" " + sol1, " " + sol2), row.index("label", 2))


def _mmlu(row: _Row, item_id: str) -> ChoiceItem:
    question, subject, choices = row.text("question"), row.text("subject"), row.texts("choices")
    if len(choices) > len(LETTERS):
        raise row.fail(f"field 'choices' has {len(choices)} choices, at most {len(LETTERS)} can be lettered")
    answer = row.index("answer", len(choices), letters=True)
    lines = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
    context = f"{header}\n\n{question.strip()}{lines}\nAnswer:"
    return ChoiceItem(item_id, context, tuple(f" {letter}" for letter in LETTERS[: len(choices)]), answer)


def _gsm8k(row: _Row, item_id: str) -> GenerateItem:
    question, solution = row.text("question"), row.text("answer")
    if "####" not in solution:
        raise row.fail("field 'answer' has no '#### <number>' final line")
    answer = solution.rsplit("####", 1)[1].replace(",", "").strip()
    if not answer:
        raise row.fail("field 'answer' has nothing after '####'")
    return GenerateItem(item_id, f"Question: {question}\nAnswer:", answer)


class _Layout(NamedTuple):
    parse: Callable[[_Row, str], Item]
    fields: str  # named in a missing-field error, so a file in the wrong layout is recognised
    domain: str
    kind: str = "multiple_choice"
    id_field: str | None = None


_LAYOUTS: dict[str, _Layout] = {
    "hellaswag": _Layout(
        _hellaswag, "activity_label, ctx_a and ctx_b (or ctx), endings, label", "commonsense", id_field="ind"
    ),
    "arc": _Layout(_arc, "id, question, choices {text, label}, answerKey", "science", id_field="id"),
    "piqa": _Layout(_piqa, "goal, sol1, sol2, label", "commonsense"),
    "mmlu": _Layout(_mmlu, "question, subject, choices, answer", "knowledge"),
    "gsm8k": _Layout(_gsm8k, "question, answer", "math", "generate"),
}
LAYOUTS = tuple(_LAYOUTS)


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    """``(where, row)`` for every row of a jsonl or parquet file, ``where`` naming its line or row."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise TaskFileError(f"{path}: not a readable parquet file ({err})") from None
        for i, row in enumerate(rows):
            yield f"{path}: row {i} (0-based)", row
        return
    for line, row in json_lines(path):
        yield f"{path}:{line}", row


def load_benchmark(
    layout: str, path: str | Path, name: str | None = None, limit: int | None = None
) -> tuple[TaskSpec, list[Item]]:
    """A benchmark file in one of :data:`LAYOUTS`, as a task spec and its items in file order.

    ``path`` is a ``.jsonl``/``.json`` file (one object per line) or a ``.parquet`` file;
    ``name`` (default: the layout) names the task and prefixes ids made from the row
    index (``"{name}/{i}"``) where the layout has no id field; ``limit`` keeps the first
    ``limit`` items. The spec's ``chance`` is the mean of ``1/len(choices)`` over the items.

    Raises ValueError for an unknown layout, a bad ``limit`` or task name, and
    TaskFileError for a missing file, an unknown suffix, an empty file, or a bad row:
    malformed json, a missing or mistyped field (a missing field names the layout's
    fields), an answer out of range or not among the labels, a GSM8K answer without
    ``####``, a duplicate id. A row error starts with ``path:line`` or ``path: row N``.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown benchmark layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    fmt = _LAYOUTS[layout]
    name = layout if name is None else name
    if fmt.kind == "generate":
        spec = TaskSpec(name, "generate", fmt.domain, match="numeric", until=["Question:", "\n\n"], max_tokens=256)
    else:
        spec = TaskSpec(name, "multiple_choice", fmt.domain)
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise TaskFileError(f"{path}: unknown file type {path.suffix!r} (expected {', '.join(SUFFIXES)})")
    if not path.is_file():
        raise TaskFileError(f"{path}: benchmark file not found")

    items: list[Item] = []
    seen: dict[str, str] = {}
    for where, data in _rows(path):
        if not isinstance(data, dict):
            raise TaskFileError(f"{where}: expected a json object, got {type(data).__name__}")
        row = _Row(data, where, layout)
        has_id = fmt.id_field is not None and data.get(fmt.id_field) not in (None, "")
        item_id = str(data[fmt.id_field]) if has_id else f"{name}/{len(items)}"
        if item_id in seen:
            raise row.fail(f"duplicate id {item_id!r} (first at {seen[item_id]})")
        seen[item_id] = where
        items.append(fmt.parse(row, item_id))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise TaskFileError(f"{path}: no items")
    if spec.kind == "multiple_choice":
        chance = sum(1 / len(item.choices) for item in items if isinstance(item, ChoiceItem)) / len(items)
        spec = dataclasses.replace(spec, chance=chance)
    return spec, items

"""Any Hugging Face dataset (hub name, or a builder such as "json"/"parquet" with
local ``data_files``) as a text source (``hf``) or a chat source (``hf_chat``).

This is how a user with network access swaps the packaged corpora for the paper's real
mixture (FineWeb-Edu, FineMath, Tulu, ...) by changing config only.
"""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.data.chat import render_text, validate
from pipeline.data.document import DataError, Document
from pipeline.data.sources import Kind, Opt


def _load(options: dict):
    import datasets  # heavy import: only when an hf source is actually used

    try:
        return datasets.load_dataset(options["path"], name=options["name"], data_files=options["data_files"],
                                     split=options["split"], streaming=options["streaming"])
    except Exception as err:  # noqa: BLE001 - any loader failure means "unavailable"
        raise DataError(f"cannot load dataset {options['path']!r}: {type(err).__name__}: {err}") from None


def _check(options: dict) -> None:
    import datasets

    try:
        builder = datasets.load_dataset_builder(options["path"], name=options["name"],
                                                data_files=options["data_files"])
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot resolve dataset {options['path']!r}: {type(err).__name__}: {err}") from None
    splits = getattr(builder.config, "data_files", None)
    if splits and options["split"].split("[")[0] not in splits:
        raise DataError(f"dataset {options['path']!r} has no split {options['split']!r} "
                        f"(has: {', '.join(splits)})")


def _text_iter(options: dict, cfg) -> Iterator[Document]:
    field = options["text_field"]
    for i, row in enumerate(_load(options)):
        if field not in row:
            raise DataError(f"source {cfg.name!r}: row {i} has no field {field!r} (has: {', '.join(row)})")
        text = row[field]
        if isinstance(text, str) and text.strip():
            yield Document(text, cfg.domain, cfg.name)


def _chat_iter(options: dict, cfg) -> Iterator[Document]:
    field = options["messages_field"]
    for i, row in enumerate(_load(options)):
        messages = row.get(field)
        if not messages:
            continue
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            validate(messages)
        except ValueError as err:
            raise DataError(f"source {cfg.name!r}: row {i}: {err}") from None
        if messages[-1]["role"] != "assistant":
            continue  # nothing to learn from a conversation without a final answer
        yield Document(render_text(messages), cfg.domain, cfg.name,
                       meta={"messages": messages, "task": options["task"]})


def _str(v) -> bool:
    return bool(v)


_COMMON = {
    "path": Opt((str,), check=_str, why="must be a dataset name or builder"),
    "licence": Opt((str,), check=_str, why="must name the dataset's licence"),
    "name": Opt((str, type(None)), None),
    "data_files": Opt((str, list, dict, type(None)), None),
    "split": Opt((str,), "train"),
    "streaming": Opt((bool,), False),
}

KINDS = [
    Kind("hf", "text", None, {**_COMMON, "text_field": Opt((str,), "text")}, _text_iter, _check),
    Kind("hf_chat", "chat", None, {**_COMMON, "messages_field": Opt((str,), "messages"),
                                   "task": Opt((str,), "hf_chat")}, _chat_iter, _check),
]

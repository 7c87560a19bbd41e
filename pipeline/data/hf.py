"""Any Hugging Face dataset (hub name, or a builder such as "json"/"parquet" with
local ``data_files``) as a text source (``hf``) or a chat source (``hf_chat``).

This is how a user with network access swaps the packaged corpora for the paper's real
mixture (FineWeb-Edu, FineMath, Tulu, ...) by changing config only.
"""

from __future__ import annotations

import functools
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.configbase import require
from pipeline.data.base import DataError, Document, Kind
from pipeline.data.chat import render_text, validate
from pipeline.hashing import sha256_file

TEXT_BUILDERS = ("json", "text", "csv")  # builders that read local files as UTF-8 text


def local_files(options: dict) -> list[Path]:
    """The local files a source's ``data_files`` names (str, list, or {split: str|list}),
    globs expanded; names that match nothing on disk are left to the loader."""
    spec = options.get("data_files")
    if spec is None:
        return []
    entries = []
    for value in spec.values() if isinstance(spec, dict) else [spec]:
        entries += value if isinstance(value, list) else [value]
    files: list[Path] = []
    for entry in entries:
        matches = sorted(glob.glob(str(entry))) if any(c in str(entry) for c in "*?[") else [str(entry)]
        files += [Path(m) for m in matches if Path(m).is_file()]
    return files


def check_local_file(path: Path, builder: str) -> None:
    """Raise DataError naming ``path`` and the cause if a local data file cannot be read
    by ``builder``: empty; not UTF-8 at byte N; malformed JSON at line N; not Parquet.

    The ``datasets`` loaders report these as ``StopIteration``, an unexplained
    ``DatasetGenerationError`` or a raw ``UnicodeDecodeError``."""
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: the file is empty")
    if builder == "parquet":
        if not (data.startswith(b"PAR1") and data.endswith(b"PAR1")):
            raise DataError(f"{path}: not a Parquet file (no PAR1 magic bytes)")
        return
    if builder not in TEXT_BUILDERS:
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not UTF-8 at byte {err.start} (line {line}): {data[err.start : err.start + 1]!r}; "
            f"re-encode the file as UTF-8"
        ) from None
    if builder == "json":
        _check_json(path, text)


def _check_json(path: Path, text: str) -> None:
    try:
        json.loads(text)  # one JSON document (an array, or an object with a field)
        return
    except ValueError:
        pass
    for number, line in enumerate(text.splitlines(), start=1):  # JSON Lines
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError as err:
            raise DataError(f"{path}: malformed JSON at line {number} ({err.msg}, column {err.colno})") from None


def _check_files(options: dict) -> None:
    for path in local_files(options):
        stat = path.stat()
        _check_once(str(path.resolve()), stat.st_size, stat.st_mtime_ns, options["path"])


@functools.lru_cache(maxsize=1024)
def _check_once(path: str, size: int, mtime_ns: int, builder: str) -> None:
    # A build checks a source several times (input check, availability, loading); the
    # file is read once per process unless it changes (size and mtime are in the key).
    check_local_file(Path(path), builder)


def _load(options: dict):
    import datasets  # heavy import: only when an hf source is actually used

    _check_files(options)
    try:
        return datasets.load_dataset(
            options["path"],
            name=options["name"],
            data_files=options["data_files"],
            split=options["split"],
            streaming=options["streaming"],
        )
    except Exception as err:  # noqa: BLE001 - any loader failure means "unavailable"
        raise DataError(f"cannot load dataset {options['path']!r}: {type(err).__name__}: {err}") from None


def _check(options: dict) -> None:
    import datasets

    _check_files(options)
    try:
        builder = datasets.load_dataset_builder(options["path"], name=options["name"], data_files=options["data_files"])
    except Exception as err:  # noqa: BLE001
        raise DataError(f"cannot resolve dataset {options['path']!r}: {type(err).__name__}: {err}") from None
    splits = getattr(builder.config, "data_files", None)
    if splits and options["split"].split("[")[0] not in splits:
        raise DataError(f"dataset {options['path']!r} has no split {options['split']!r} (has: {', '.join(splits)})")


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
        # Only assistant turns are trained on: trailing turns after the last answer teach
        # nothing, so they are cut; a conversation with no answer at all is dropped.
        # Both are counted in the manifest (documents_trimmed / documents_dropped).
        last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        if last < 0:
            yield Document("", cfg.domain, cfg.name, meta={"dropped": "no assistant turn"})
            continue
        trimmed = len(messages) - (last + 1)
        messages = messages[: last + 1]
        yield Document(
            render_text(messages),
            cfg.domain,
            cfg.name,
            meta={"messages": messages, "task": options["task"], "trimmed_turns": trimmed},
        )


@dataclass(frozen=True)
class DatasetOptions:
    """A dataset by builder or hub name (``datasets.load_dataset(path, name, ...)``)."""

    path: str
    licence: str
    name: str | None = None
    data_files: str | list | dict | None = None
    split: str = "train"
    streaming: bool = False

    def __post_init__(self) -> None:
        require(bool(self.path), "path", "must be a dataset name or builder")
        require(bool(self.licence), "licence", "must name the dataset's licence")


@dataclass(frozen=True)
class TextOptions(DatasetOptions):
    text_field: str = "text"


@dataclass(frozen=True)
class ChatOptions(DatasetOptions):
    messages_field: str = "messages"
    task: str = "hf_chat"


def _origin(options: dict) -> dict[str, str]:
    # Local data files only: a hub dataset is fetched by every node from the same hub.
    return {str(path): sha256_file(path) for path in local_files(options)}


KINDS = [
    Kind("hf", "text", None, TextOptions, _text_iter, _check, _origin),
    Kind(
        "hf_chat",
        "chat",
        None,
        ChatOptions,
        _chat_iter,
        _check,
        _origin,
    ),
]

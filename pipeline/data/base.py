"""The data package's base types: the unit every source yields (:class:`Document`), the
error raised when data (not config) is wrong, and what a source kind declares
(:class:`Kind`, its options as a config dataclass). Imports nothing else of the package, so
every adapter can build on it without a cycle."""

from __future__ import annotations

import dataclasses
import hashlib
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.configbase import from_dict


class DataError(RuntimeError):
    """A source is unavailable or yielded nothing usable. The message names the source."""


@dataclass(frozen=True)
class Document:
    """One training document.

    ``key`` groups documents that must land in the same split (e.g. every chunk of a
    Bible chapter, or the code and the docstring of ``json.dumps``). It defaults to the
    normalised text, so unrelated documents split independently.
    """

    text: str
    domain: str
    source: str
    key: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def split_key(self) -> str:
        return self.key or normalise(self.text)


def normalise(text: str) -> str:
    """Canonical form used for exact-duplicate detection: NFC, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_hash(text: str) -> str:
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


def unit_hash(key: str) -> float:
    """Map a key to [0, 1) with a fixed, seed-free hash.

    Seed-free on purpose: a document with the same key falls on the same side of the
    threshold in every mixture, so a held-out item of one mixture is held out of every
    mixture whose val_fraction is at least as large.
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Named(Protocol):
    """What an adapter reads of the source it iterates: the name and domain its documents carry."""

    name: str
    domain: str


@dataclass(frozen=True)
class Kind:
    name: str
    produces: str  # "text" or "chat"
    licence: str | None  # None: taken from the required option "licence"
    # The kind's options: a dataclass validated by configbase.from_dict, as every
    # config is (field types checked strictly, __post_init__ checks the values).
    options: type
    iterate: Callable[[dict, Named], Iterator[Document]]  # (resolved options, the source)
    check: Callable[[dict], None] = lambda options: None
    # What the source reads from the machine (data files, the interpreter's stdlib) as
    # {what: sha256 or version}: a build on another node must see the same (build.py).
    origin: Callable[[dict], dict[str, str]] = lambda options: {}
    # The Debian package that provides the data at the default options, when the data is
    # a system package's (`make setup` installs it: pipeline/data/system.py).
    debian: str | None = None

    def resolve(self, options: Mapping[str, Any]) -> dict:
        """``options`` validated, with every default filled in (what ``iterate``
        receives). Raises ConfigError naming ``options.<key>``."""
        return dataclasses.asdict(from_dict(self.options, options, "options"))

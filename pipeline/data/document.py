"""The unit every source yields, and the error raised when data (not config) is wrong."""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field


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

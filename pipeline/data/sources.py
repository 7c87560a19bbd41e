"""Source configs and the registry of source kinds.

A mixture is a list of :class:`SourceConfig`; each names a *kind* (bible, fortunes,
python_code, hf, ...). A kind (:class:`~pipeline.data.base.Kind`) declares its options
(validated at config time), its licence, a cheap availability check, and an iterator of
:class:`Document`. Chat kinds (the SFT tasks) live in the same registry and yield
documents whose ``meta`` carries the conversation; ``produces`` tells a mixture which
kinds it may use. No adapter imports this module (they build on
:mod:`pipeline.data.base`, and the SFT tasks call the corpora's adapters directly); this
module imports them all at its top, so the registry is complete once it is imported.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.configbase import ConfigError, from_dict, require
from pipeline.data import generated, hf, packaged, sft_tasks, stdlib
from pipeline.data.base import DataError, Document, Kind

__all__ = [
    "DataError",
    "Document",
    "SourceConfig",
    "Kind",
    "KINDS",
    "kind_of",
    "check_available",
    "iter_documents",
    "materialise",
    "licence_of",
]

KINDS: dict[str, Kind] = {
    k.name: k for k in (*packaged.KINDS, *stdlib.KINDS, *generated.KINDS, *hf.KINDS, *sft_tasks.KINDS)
}


def kind_of(name: str) -> Kind:
    return KINDS[name]


def _plain(value: Any) -> Any:
    """Deep-convert mappings/sequences (e.g. OmegaConf containers) to dict/list."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


@dataclass
class SourceConfig:
    """One entry of a mixture.

    ``optional`` sources that are unavailable are skipped by the mixer with a warning
    that is also recorded in the manifest; a non-optional unavailable source fails the
    build before any work is done.
    """

    name: str
    kind: str
    weight: float = 1.0
    domain: str = "web"
    max_docs: int | None = None
    optional: bool = False
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f" (source {self.name!r})"
        require(isinstance(self.name, str) and bool(self.name), "name", "must be a non-empty string")
        kinds = KINDS
        require(
            self.kind in kinds, "kind", f"unknown source kind {self.kind!r}{where} (known: {', '.join(sorted(kinds))})"
        )
        require(
            isinstance(self.weight, (int, float)) and not isinstance(self.weight, bool) and math.isfinite(self.weight),
            "weight",
            f"must be a finite number{where}",
        )
        require(self.weight >= 0, "weight", f"must be >= 0, got {self.weight}{where}")
        require(isinstance(self.domain, str) and bool(self.domain), "domain", f"must be a non-empty string{where}")
        require(
            self.max_docs is None or (isinstance(self.max_docs, int) and self.max_docs > 0),
            "max_docs",
            f"must be a positive integer or null{where}",
        )
        require(isinstance(self.optional, bool), "optional", f"must be true or false{where}")
        require(isinstance(self.options, Mapping), "options", f"must be a mapping{where}")
        self.options = _plain(self.options)
        self._validate_options(kinds[self.kind], where)

    def _validate_options(self, kind: Kind, where: str) -> None:
        fields = dataclasses.fields(kind.options)
        for f in fields:  # named here: a dataclass would only say "missing argument"
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            missing = required and f.name not in self.options
            require(not missing, f"options.{f.name}", f"required for kind {kind.name!r}{where}")
        try:
            from_dict(kind.options, self.options, "options")
        except ConfigError as err:
            raise ConfigError(f"{err} (kind {kind.name!r}{where.replace(' (', ', ')}") from None

    @property
    def produces(self) -> str:
        return kind_of(self.kind).produces

    def resolved_options(self) -> dict:
        """Options with every default filled in (what the adapter actually receives)."""
        return kind_of(self.kind).resolve(self.options)

    def cache_key(self) -> str:
        return json.dumps([self.kind, self.domain, self.max_docs, self.resolved_options()], sort_keys=True, default=str)


def licence_of(cfg: SourceConfig) -> str:
    kind = kind_of(cfg.kind)
    return kind.licence if kind.licence is not None else str(cfg.resolved_options()["licence"])


def check_available(cfg: SourceConfig) -> None:
    """Cheap check (no materialisation) that the source's data can be read."""
    try:
        kind_of(cfg.kind).check(cfg.resolved_options())
    except DataError as err:
        raise DataError(f"source {cfg.name!r} ({cfg.kind}) unavailable: {err}") from None


def iter_documents(cfg: SourceConfig) -> Iterator[Document]:
    """The source's documents; ``max_docs`` counts usable ones only (an item the source
    could not use, marked ``meta["dropped"]``, passes through without counting)."""
    usable = 0
    for doc in kind_of(cfg.kind).iterate(cfg.resolved_options(), cfg):
        if cfg.max_docs and usable >= cfg.max_docs:
            return
        if not doc.meta.get("dropped"):
            usable += 1
        yield doc


def materialise(cfg: SourceConfig, dropped: list[Document] | None = None) -> list[Document]:
    """All documents of a source (up to ``max_docs``); an empty source is an error.

    A source may yield a document with empty text for an item it could not use (its
    ``meta["dropped"]`` says why); such items are left out and, when ``dropped`` is a
    list, appended to it so the caller can count them."""
    check_available(cfg)
    docs = []
    for d in iter_documents(cfg):
        if d.text.strip():
            docs.append(d)
        elif dropped is not None and d.meta.get("dropped"):
            dropped.append(d)
    if not docs:
        raise DataError(f"source {cfg.name!r} yielded no documents")
    return docs

"""Data mixtures: a list of weighted sources -> deduplicated, split, tokenised files.

Pipeline of :func:`build_mixture` (every step deterministic given ``seed``):

1. materialise each source (weight > 0; unavailable *optional* sources are skipped
   with a warning recorded in the manifest);
2. drop exact duplicates (sha256 of NFC, whitespace-collapsed text) across the whole
   mixture, *before* splitting, so no text is in both train and val;
3. split by document: val iff ``unit_hash(doc key) < val_fraction`` (seed-free, so the
   assignment is stable across runs and mixtures);
4. tokenise, then sample each source's train documents to its token share of
   ``total_tokens`` (down-sampling, or repeating a small source up to ``max_repeat``
   times; the repetition is recorded);
5. shuffle and write ``{train,val}_tokens.npy`` (uint32) and ``{train,val}_loss_mask.npy``
   (uint8), plus ``manifest.json`` (and ``val_conversations.jsonl`` for chat).

File format: documents concatenated, each ``<|bos|> ... <|eos|>``. ``mask[i] == 1``
means token ``i`` is a prediction target (see pipeline/data/chat.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.configbase import ConfigError, from_dict, require
from pipeline.data.base import DataError, Document, text_hash, unit_hash
from pipeline.data.chat import render_many
from pipeline.data.sources import SourceConfig, check_available, licence_of, materialise
from pipeline.data.tokenizer import Tokenizer, fingerprint
from pipeline.hashing import sha256_file

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
MIXTURE_KINDS = ("text", "chat")


@dataclass
class MixtureConfig:
    sources: list[SourceConfig]
    total_tokens: int
    val_fraction: float = 0.05
    seed: int = 0
    kind: str = "text"
    max_repeat: float = 4.0

    def __post_init__(self) -> None:
        require(
            isinstance(self.sources, (list, tuple)) and len(self.sources) > 0,
            "sources",
            "must be a non-empty list of sources",
        )
        built = []
        for i, src in enumerate(self.sources):
            if isinstance(src, Mapping):
                src = from_dict(SourceConfig, src, where=f"sources[{i}]")
            require(isinstance(src, SourceConfig), f"sources[{i}]", "must be a source mapping")
            built.append(src)
        self.sources = built
        require(self.kind in MIXTURE_KINDS, "kind", f"must be one of {MIXTURE_KINDS}, got {self.kind!r}")
        seen: dict[str, int] = {}
        for i, src in enumerate(built):
            require(
                src.name not in seen,
                f"sources[{i}].name",
                f"duplicate source name {src.name!r} (also sources[{seen.get(src.name)}])",
            )
            seen[src.name] = i
            require(
                src.produces == self.kind,
                f"sources[{i}].kind",
                f"kind {src.kind!r} produces {src.produces} documents but this mixture is {self.kind!r}",
            )
        require(sum(s.weight for s in built) > 0, "sources", "weights sum to 0: at least one source needs weight > 0")
        require(
            isinstance(self.total_tokens, int) and not isinstance(self.total_tokens, bool) and self.total_tokens > 0,
            "total_tokens",
            "must be a positive integer",
        )
        require(
            isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 0.5,
            "val_fraction",
            f"must be in (0, 0.5), got {self.val_fraction}",
        )
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", "must be an integer")
        require(isinstance(self.max_repeat, (int, float)) and self.max_repeat >= 1, "max_repeat", "must be >= 1")

    @property
    def active_sources(self) -> list[SourceConfig]:
        return [s for s in self.sources if s.weight > 0]


# --- 1-3: collect, dedup, split -------------------------------------------------------------


@dataclass
class SourceDocs:
    cfg: SourceConfig
    train: list[Document] = field(default_factory=list)
    val: list[Document] = field(default_factory=list)
    raw: int = 0
    duplicates: int = 0
    dropped: int = 0  # items the source could not use at all (e.g. a chat without an answer)
    trimmed: int = 0  # items kept in part (e.g. a chat's trailing unanswered user turn)


@dataclass
class Collected:
    cfg: MixtureConfig
    sources: list[SourceDocs]
    skipped: list[dict]
    warnings: list[str]


def collect(cfg: MixtureConfig, cache: dict[str, tuple[list[Document], int]] | None = None) -> Collected:
    """Materialise, deduplicate and split. ``cache`` shares materialised sources
    between mixtures of one build (keyed by the source's kind/options/caps)."""
    cache = {} if cache is None else cache
    skipped, warnings, out = [], [], []
    seen: set[str] = set()
    for src in cfg.active_sources:
        try:
            check_available(src)
        except DataError as err:
            if not src.optional:
                raise
            msg = f"optional source {src.name!r} skipped: {err}"
            log.warning(msg)
            skipped.append({"name": src.name, "kind": src.kind, "reason": str(err)})
            warnings.append(msg)
            continue
        key = src.cache_key()
        if key not in cache:
            dropped: list[Document] = []
            cache[key] = (materialise(src, dropped), len(dropped))
        docs, n_dropped = cache[key]
        sd = SourceDocs(
            src, raw=len(docs), dropped=n_dropped, trimmed=sum(1 for d in docs if d.meta.get("trimmed_turns"))
        )
        for doc in docs:
            h = text_hash(doc.text)
            if h in seen:
                sd.duplicates += 1
                continue
            seen.add(h)
            (sd.val if unit_hash(doc.split_key()) < cfg.val_fraction else sd.train).append(doc)
        if not sd.train:
            raise DataError(
                f"source {src.name!r} has no training documents after dedup and split "
                f"({sd.raw} documents, {sd.duplicates} duplicates)"
            )
        out.append(sd)
    if not out:
        raise DataError("mixture has no available sources")
    return Collected(cfg, out, skipped, warnings)


def _rng(seed: int, *parts: str) -> np.random.Generator:
    # Per-source streams: adding or removing one source does not reshuffle the others.
    digest = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


def tokenizer_corpus(collected: Collected, max_bytes: int) -> list[str]:
    """Train-split texts for tokenizer training: each source contributes up to its
    weight's share of ``max_bytes`` (val text never reaches the tokenizer)."""
    total_w = sum(sd.cfg.weight for sd in collected.sources)
    texts = []
    for sd in collected.sources:
        budget = max_bytes * sd.cfg.weight / total_w
        used = 0
        for i in _rng(collected.cfg.seed, "tokenizer", sd.cfg.name).permutation(len(sd.train)):
            if used >= budget:
                break
            texts.append(sd.train[i].text)
            used += len(sd.train[i].text.encode("utf-8"))
    return texts


def train_tokenizer_on_mixture(collected: Collected, vocab_size: int, max_bytes: int = 4_000_000) -> Tokenizer:
    return Tokenizer.train(tokenizer_corpus(collected, max_bytes), vocab_size)


# --- 4: tokenise and sample ------------------------------------------------------------------

Piece = tuple[np.ndarray, np.ndarray]  # (token ids, loss mask) of one framed document
_CHUNK = 512  # documents tokenised per batch while sampling


class _LazyTokens:
    """Tokenises documents on demand, so a down-sampled source is only tokenised as far
    as its sample reaches. ``cache`` (id(doc) -> (doc, piece)) is shared across the
    mixtures of one build; it holds the doc too, so an id is never reused while cached."""

    def __init__(self, docs: list[Document], kind: str, tok: Tokenizer, cache: dict):
        self.docs, self.kind, self.tok, self.cache = docs, kind, tok, cache

    def get(self, indices) -> list[Piece]:
        missing = [self.docs[i] for i in indices if id(self.docs[i]) not in self.cache]
        for doc, piece in zip(missing, _tokenise(missing, self.kind, self.tok)):
            self.cache[id(doc)] = (doc, piece)
        return [self.cache[id(self.docs[i])][1] for i in indices]


def _tokenise(docs: list[Document], kind: str, tok: Tokenizer) -> list[Piece]:
    if not docs:
        return []
    if kind == "text":
        out = []
        for ids in tok.encode_batch([d.text for d in docs]):
            seq = np.array([tok.bos_id, *ids, tok.eos_id], dtype=np.uint32)
            mask = np.ones(len(seq), dtype=np.uint8)
            mask[0] = 0  # bos is not predictable from the previous document
            out.append((seq, mask))
        return out
    # eos after the final <|end|> is framing only: not a target in chat data.
    return [
        (np.array(ids + [tok.eos_id], dtype=np.uint32), np.array(mask + [0], dtype=np.uint8))
        for ids, mask in render_many([d.meta["messages"] for d in docs], tok, add_bos=True)
    ]


def _prefix_to(order: np.ndarray, lazy: _LazyTokens, target: float) -> tuple[list[int], int, bool]:
    """Shortest prefix of ``order`` holding >= ``target`` tokens (or all of it).
    Returns (indices, tokens, reached)."""
    picked: list[int] = []
    total = 0
    for start in range(0, len(order), _CHUNK):
        chunk = order[start : start + _CHUNK].tolist()
        for i, piece in zip(chunk, lazy.get(chunk)):
            if total >= target:
                return picked, total, True
            picked.append(i)
            total += len(piece[0])
    return picked, total, total >= target


def _sample_train(lazy: _LazyTokens, target: float, max_repeat: float, rng) -> tuple[list[int], int | None]:
    """Document indices (with repeats) reaching ``target`` tokens, and the source's
    unique token count when it had to be tokenised completely (else None)."""
    picked, total, reached = _prefix_to(rng.permutation(len(lazy.docs)), lazy, target)
    if reached:
        return picked, None
    available = total  # every document used once and still short: repeat
    passes = min(target / available, max_repeat)
    for _ in range(int(math.floor(passes)) - 1):
        picked += rng.permutation(len(lazy.docs)).tolist()
    remainder = (passes - math.floor(passes)) * available
    if remainder > 0:
        picked += _prefix_to(rng.permutation(len(lazy.docs)), lazy, remainder)[0]
    return picked, available


# --- 5: write ------------------------------------------------------------------------------


def _write_split(out_dir: Path, split: str, pieces: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    tokens = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, np.uint32)
    mask = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.uint8)
    files = {}
    for name, arr in ((f"{split}_tokens.npy", tokens), (f"{split}_loss_mask.npy", mask)):
        np.save(out_dir / name, arr, allow_pickle=False)
        files[name] = {"sha256": sha256_file(out_dir / name), "dtype": str(arr.dtype), "length": int(arr.size)}
    return files


def build_mixture(
    cfg: MixtureConfig,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    collected: Collected | None = None,
    token_cache: dict | None = None,
) -> dict:
    """Write the mixture files into ``out_dir`` and return the manifest.

    ``collected`` (from :func:`collect`) and ``token_cache`` let a caller building
    several mixtures share materialised and tokenised documents."""
    token_cache = {} if token_cache is None else token_cache
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    collected = collected if collected is not None else collect(cfg)
    total_w = sum(sd.cfg.weight for sd in collected.sources)
    val_target = cfg.total_tokens * cfg.val_fraction / (1 - cfg.val_fraction)
    chosen: dict[str, list[tuple[Document, tuple[np.ndarray, np.ndarray]]]] = {s: [] for s in SPLITS}
    per_source: dict[str, dict] = {}
    warnings = list(collected.warnings)

    for sd in collected.sources:
        name, share = sd.cfg.name, sd.cfg.weight / total_w
        stats: dict[str, Any] = {
            "kind": sd.cfg.kind,
            "domain": sd.cfg.domain,
            "licence": licence_of(sd.cfg),
            "options": sd.cfg.resolved_options(),
            "max_docs": sd.cfg.max_docs,
            "weight_requested": share,
            "documents_raw": sd.raw,
            "duplicates_removed": sd.duplicates,
            "documents_dropped": sd.dropped,
            "documents_trimmed": sd.trimmed,
            "tokens": {},
            "target_tokens": {},
            "bytes": {},
        }
        for split, docs in (("train", sd.train), ("val", sd.val)):
            lazy = _LazyTokens(docs, cfg.kind, tokenizer, token_cache)
            rng = _rng(cfg.seed, split, name)
            if split == "train":
                target = cfg.total_tokens * share
                idx, available = _sample_train(lazy, target, cfg.max_repeat, rng)
                distinct = sorted(set(idx))
                avail_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
                stats.update(
                    {
                        "unique_train_tokens_available": available,  # null: not all needed tokenising
                        "unique_train_bytes_available": avail_bytes,
                        "repetition": len(idx) / len(distinct),
                        "data_used_fraction": sum(len(docs[i].text.encode("utf-8")) for i in distinct) / avail_bytes,
                        "documents": {"train": len(idx), "train_distinct": len(distinct), "train_available": len(docs)},
                    }
                )
                if available is not None and target > cfg.max_repeat * available:
                    msg = (
                        f"source {name!r} needs {target / available:.1f} passes to reach its weight but "
                        f"max_repeat is {cfg.max_repeat}: its share will be below the request"
                    )
                    log.warning(msg)
                    warnings.append(msg)
            else:
                idx = _prefix_to(rng.permutation(len(docs)), lazy, val_target * share)[0]
                stats["documents"].update({"val": len(idx), "val_available": len(docs)})
            pieces = lazy.get(idx)
            chosen[split] += [(docs[i], p) for i, p in zip(idx, pieces)]
            stats["tokens"][split] = int(sum(len(p[0]) for p in pieces))
            stats["target_tokens"][split] = int(sum(int(p[1].sum()) for p in pieces))
            stats["bytes"][split] = int(sum(len(docs[i].text.encode("utf-8")) for i in idx))
        per_source[name] = stats

    files, totals = {}, {}
    domains = sorted({d.domain for split in SPLITS for d, _ in chosen[split]})
    for split in SPLITS:
        order = _rng(cfg.seed, "shuffle", split).permutation(len(chosen[split]))
        items = [chosen[split][i] for i in order]
        files.update(_write_split(out_dir, split, [p for _, p in items]))
        if split == "val":
            # Which domain each val token came from, so validation loss can be split by
            # domain (e.g. to see mid-training move the domains it emphasises).
            ids = [np.full(len(p[0]), domains.index(d.domain), np.uint8) for d, p in items]
            domain_ids = np.concatenate(ids) if ids else np.zeros(0, np.uint8)
            path = out_dir / "val_domains.npy"
            np.save(path, domain_ids, allow_pickle=False)
            files["val_domains.npy"] = {"sha256": sha256_file(path), "dtype": "uint8", "length": int(domain_ids.size)}
        totals[split] = {
            "documents": len(items),
            "tokens": sum(s["tokens"][split] for s in per_source.values()),
            "target_tokens": sum(s["target_tokens"][split] for s in per_source.values()),
            "bytes": sum(s["bytes"][split] for s in per_source.values()),
        }
        if cfg.kind == "chat" and split == "val":
            _write_conversations(out_dir / "val_conversations.jsonl", [d for d, _ in items])
    for s in per_source.values():
        s["weight_achieved"] = s["tokens"]["train"] / totals["train"]["tokens"]

    manifest = {
        "kind": cfg.kind,
        "seed": cfg.seed,
        "total_tokens_requested": cfg.total_tokens,
        "val_fraction": cfg.val_fraction,
        "max_repeat": cfg.max_repeat,
        "split_rule": "val iff sha256(document key) / 2**64 < val_fraction (seed-free, by document)",
        "dedup": {
            "method": "exact: sha256 of NFC, whitespace-collapsed text, across the mixture, before the split",
            "removed": sum(s["duplicates_removed"] for s in per_source.values()),
        },
        "loss_mask": "mask[i] == 1: token i is a prediction target",
        "bits_per_byte": "loss_nats_per_target_token / ln(2) * target_tokens / bytes",
        "tokenizer": {"vocab_size": tokenizer.vocab_size, "sha256": fingerprint(tokenizer)},
        "domains": domains,  # val_domains.npy holds indices into this list
        "sources": per_source,
        "skipped_sources": collected.skipped,
        "warnings": warnings,
        "totals": totals,
        "files": files,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def _write_conversations(path: Path, docs: list[Document]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for d in docs:
            row = {"source": d.source, "task": d.meta.get("task"), "key": d.split_key(), "messages": d.meta["messages"]}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_val_domains(mixture_dir: str | Path) -> tuple[np.ndarray, list[str]]:
    """Memory-mapped per-token domain ids of the val split, and the domain names."""
    mixture_dir = Path(mixture_dir)
    path = mixture_dir / "val_domains.npy"
    if not path.is_file():
        raise FileNotFoundError(f"mixture file not found: {path} (run the data stage first)")
    names = json.loads((mixture_dir / "manifest.json").read_text())["domains"]
    return np.load(path, mmap_mode="r", allow_pickle=False), names


def load_split(mixture_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-mapped (tokens, loss_mask) of one split; never unpickles."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    arrays = []
    for name in (f"{split}_tokens.npy", f"{split}_loss_mask.npy"):
        path = Path(mixture_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"mixture file not found: {path} (run the data stage first)")
        arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
    if arrays[0].shape != arrays[1].shape:
        raise DataError(f"{mixture_dir}: {split} tokens and loss mask differ in length")
    return arrays[0], arrays[1]


__all__ = [
    "MixtureConfig",
    "Collected",
    "collect",
    "build_mixture",
    "tokenizer_corpus",
    "train_tokenizer_on_mixture",
    "load_split",
    "load_val_domains",
    "ConfigError",
    "DataError",
]

"""The mix stage's single entry point: tokenizer + pretrain/midtrain/sft mixtures.

Everything is validated before any work (configs, mixture kinds, availability of every
non-optional source), and the outputs are built in a temporary sibling directory that
replaces ``out_dir`` only once complete, so a failed build leaves an earlier
``out_dir`` untouched.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.configbase import ConfigError, require
from pipeline.data.base import DataError
from pipeline.data.mixing import MixtureConfig, build_mixture, collect, load_split, train_tokenizer_on_mixture
from pipeline.data.sources import check_available
from pipeline.data.tokenizer import MIN_VOCAB
from pipeline.fsutil import replace_dir

log = logging.getLogger(__name__)

EXPECTED_KIND = {"pretrain": "text", "midtrain": "text", "sft": "chat"}


def validate_all(mixtures: dict[str, MixtureConfig], vocab_size: int) -> None:
    """Raise ConfigError/DataError naming the problem; cheap (no materialisation)."""
    require(
        isinstance(vocab_size, int) and MIN_VOCAB <= vocab_size < 2**32,
        "vocab_size",
        f"must be an integer in [{MIN_VOCAB}, 2**32)",
    )
    for role, cfg in mixtures.items():
        require(isinstance(cfg, MixtureConfig), role, "must be a MixtureConfig")
        require(
            cfg.kind == EXPECTED_KIND[role],
            f"{role}.kind",
            f"must be {EXPECTED_KIND[role]!r} for the {role} mixture, got {cfg.kind!r}",
        )
        for src in cfg.active_sources:
            if src.optional:
                continue  # skipped (with a recorded warning) when unavailable
            try:
                check_available(src)
            except DataError as err:
                raise DataError(f"{role}.sources[{cfg.sources.index(src)}]: {err}") from None


def unigram_stats(train: np.ndarray, val: np.ndarray, val_mask: np.ndarray, vocab_size: int) -> dict:
    """Entropy of the val target-token distribution, and the cross-entropy of val under
    an add-one-smoothed unigram model of train: a model must beat the latter."""
    targets = val[val_mask.astype(bool)]
    counts = np.bincount(targets, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    q = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    q /= q.sum()
    xent = float(-(counts * np.log(q)).sum() / counts.sum())
    return {
        "val_unigram_entropy_nats": entropy,
        "val_unigram_entropy_bits": entropy / math.log(2),
        "val_unigram_xent_from_train_nats": xent,
        "val_unigram_xent_from_train_bits": xent / math.log(2),
    }


def build_all(
    pretrain: MixtureConfig,
    midtrain: MixtureConfig,
    sft: MixtureConfig,
    vocab_size: int,
    out_dir: str | Path,
    tokenizer_max_bytes: int = 4_000_000,
) -> dict:
    """Build tokenizer/ pretrain/ midtrain/ sft/ and metrics.json as ``out_dir``, which is
    replaced whole only once the build is complete (a failed build leaves it as it was).
    Returns the metrics."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.building-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        metrics = build_into(tmp, pretrain, midtrain, sft, vocab_size, tokenizer_max_bytes)
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def source_origins(mixtures: dict[str, MixtureConfig]) -> dict[str, dict[str, str]]:
    """What every used source (weight > 0) reads from this machine, by source:
    ``{"data.<role>.sources[i] ('name', kind k)": {what: sha256 or version}}`` (see
    ``Kind.origin``). A source that cannot be read here says so instead of raising."""
    from pipeline.data.sources import kind_of

    origins: dict[str, dict[str, str]] = {}
    for role, cfg in mixtures.items():
        for i, src in enumerate(cfg.sources):
            if src.weight <= 0:
                continue
            where = f"data.{role}.sources[{i}] ({src.name!r}, kind {src.kind})"
            try:
                origins[where] = kind_of(src.kind).origin(src.resolved_options())
            except (DataError, OSError) as err:
                origins[where] = {"unreadable": str(err)}
    return origins


def check_origins(expected: dict[str, dict[str, str]], mixtures: dict[str, MixtureConfig]) -> None:
    """Raise DataError, naming each source and what differs, unless this machine's
    :func:`source_origins` equal ``expected`` (those of the machine that checked the
    stage's inputs): a mixture must not depend on which node built it."""
    here = source_origins(mixtures)
    diffs = []
    for where in sorted(set(expected) | set(here)):
        theirs, ours = expected.get(where, {}), here.get(where, {})
        for what in sorted(set(theirs) | set(ours)):
            if theirs.get(what) != ours.get(what):
                diffs.append(f"{where}: {what} is {ours.get(what, 'absent')} here, {theirs.get(what, 'absent')} there")
    if diffs:
        raise DataError(
            "this node reads other source data than the machine that checked the stage's inputs; give every node "
            "the same environment (requirements.lock, the same Python and Debian packages, shared data paths): "
            + "; ".join(diffs)
        )


def build_into(
    directory: Path,
    pretrain: MixtureConfig,
    midtrain: MixtureConfig,
    sft: MixtureConfig,
    vocab_size: int,
    tokenizer_max_bytes: int = 4_000_000,
    origins: dict[str, dict[str, str]] | None = None,
) -> dict:
    """Write tokenizer/ pretrain/ midtrain/ sft/ and metrics.json into the (empty)
    ``directory``; for a caller that publishes the result itself (the mix stage).
    ``origins``: the sources as another machine sees them (:func:`source_origins`);
    given, this machine must see the same (DataError otherwise, before any work).

    metrics.json holds only what the inputs determine (no timings), so rebuilding from
    the same inputs gives the same bytes."""
    t0 = time.perf_counter()
    mixtures = {"pretrain": pretrain, "midtrain": midtrain, "sft": sft}
    validate_all(mixtures, vocab_size)
    if origins is not None:
        check_origins(origins, mixtures)
    require(
        isinstance(tokenizer_max_bytes, int) and tokenizer_max_bytes > 0,
        "tokenizer_max_bytes",
        "must be a positive integer",
    )
    directory = Path(directory)
    metrics = _build_into(directory, mixtures, vocab_size, tokenizer_max_bytes)
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    log.info("data built in %.1fs -> %s", time.perf_counter() - t0, directory)
    return metrics


def _build_into(tmp: Path, mixtures: dict[str, MixtureConfig], vocab_size: int, max_bytes: int) -> dict:
    cache: dict = {}
    collected = {role: collect(cfg, cache) for role, cfg in mixtures.items()}
    # The tokenizer sees only the pre-training mixture's train split.
    tokenizer = train_tokenizer_on_mixture(collected["pretrain"], vocab_size, max_bytes)
    tokenizer.save(tmp / "tokenizer" / "tokenizer.json")
    metrics: dict = {"vocab_size": tokenizer.vocab_size, "mixtures": {}}
    token_cache: dict = {}
    for role, cfg in mixtures.items():
        manifest = build_mixture(cfg, tokenizer, tmp / role, collected[role], token_cache)
        metrics["mixtures"][role] = {
            split: {k: manifest["totals"][split][k] for k in ("tokens", "target_tokens", "bytes", "documents")}
            for split in ("train", "val")
        }
        metrics["mixtures"][role]["skipped_sources"] = [s["name"] for s in manifest["skipped_sources"]]
    train, _ = load_split(tmp / "pretrain", "train")
    val, val_mask = load_split(tmp / "pretrain", "val")
    metrics["pretrain"] = unigram_stats(np.asarray(train), np.asarray(val), np.asarray(val_mask), tokenizer.vocab_size)
    tot = metrics["mixtures"]["pretrain"]["val"]
    metrics["pretrain"]["val_target_tokens_per_byte"] = tot["target_tokens"] / max(tot["bytes"], 1)
    return metrics


__all__ = ["build_all", "build_into", "validate_all", "unigram_stats", "ConfigError", "DataError"]

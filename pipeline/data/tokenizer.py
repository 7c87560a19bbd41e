"""Byte-level BPE tokenizer (HF ``tokenizers``) and the one list of special tokens.

Byte-level pre-tokenisation means every string is representable, so
``decode(encode(x)) == x`` for any text. Special tokens are only ever inserted by id
(chat template, document framing): text that merely *contains* ``<|end|>`` is encoded
as ordinary bytes, so data cannot forge a turn boundary.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from pipeline.configbase import require

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


class Tokenizer:
    """Thin wrapper: plain-text encode/decode plus named special token ids."""

    def __init__(self, hf: _HFTokenizer):
        self._hf = hf
        # Treat special-token strings inside text as plain text (see module docstring).
        self._hf.encode_special_tokens = True
        ids = {tok: hf.token_to_id(tok) for tok in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.special_ids: dict[str, int] = ids  # type: ignore[assignment]
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[PAD]
        self.system_id, self.user_id, self.assistant_id, self.end_id = (
            ids[SYSTEM],
            ids[USER],
            ids[ASSISTANT],
            ids[END],
        )

    # -- construction ----------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        require(
            isinstance(vocab_size, int) and vocab_size >= MIN_VOCAB,
            "vocab_size",
            f"must be an integer >= {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)",
        )
        hf = _HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            min_frequency=2,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(_nonempty(texts), trainer=trainer)
        # A small corpus can run out of merges before vocab_size; pad with reserved
        # tokens so the vocabulary (and the model's embedding size) is exactly as configured.
        short = vocab_size - hf.get_vocab_size()
        if short > 0:
            hf.add_special_tokens([f"<|reserved_{i}|>" for i in range(short)])
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(_HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(path))
        return path

    # -- use ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self._hf.id_to_token(i)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    return (t for t in texts if t)


def fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the serialised tokenizer (vocab, merges, specials): pins token ids."""
    import hashlib

    return hashlib.sha256(tokenizer._hf.to_str().encode("utf-8")).hexdigest()

"""The profile stage's config: which program, which prompts, how many threads and runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.configbase import require
from pipeline.export.config import KV_CACHE_DTYPE_NAMES

BASELINES = ("dense_total", "dense_active")


@dataclass
class ProfileStageConfig:
    program: str  # the export stage's model.pte
    quantized: str  # QAT's converted model: the same weights, replayed eagerly for the expert load
    prompts_mixture: str  # held-out prompts come from this mixture's val split
    tokenizer: str = ""  # tokenizer.json: ExecuTorch's LLM runner reads the prompts as text
    kv_cache: str = "float32"  # the exported program's cache dtype: the twins get the same
    out_dir: str = "outputs/profile"
    # XNNPACK threads (the paper measured phones at 4 and 2); at most the device's cores.
    threads: int = 2
    # Each run prefills a held-out prompt of this many tokens (TTFT, prefill tok/s at
    # that length), then decodes `decode_tokens` more (decode tok/s at that context).
    prompt_lengths: list[int] = field(default_factory=lambda: [16, 64, 192])
    decode_tokens: int = 32
    warmup: int = 1  # runs per length and program before the measured ones
    repeats: int = 5  # measured runs, each on a different held-out prompt
    # Dense twins exported through the same path (random weights: speed does not depend
    # on what was learned): same total parameters (the paper's equal-memory comparison),
    # same active parameters.
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    group_size: int = 32  # INT4 group of the twins (QAT's, so the programs match)
    bandwidth_mib: int = 512  # buffer of the read-bandwidth measurement (>> last-level cache)
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("program", "quantized", "prompts_mixture", "tokenizer", "out_dir"):
            require(bool(getattr(self, key)), key, "must be a non-empty path")
        for key in ("threads", "decode_tokens", "repeats", "group_size", "bandwidth_mib"):
            value = getattr(self, key)
            require(isinstance(value, int) and value >= 1, key, f"must be a positive int, got {value!r}")
        require(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
        require(bool(self.prompt_lengths), "prompt_lengths", "must name at least one length")
        require(all(n >= 1 for n in self.prompt_lengths), "prompt_lengths", f"must be >= 1, got {self.prompt_lengths}")
        require(
            len(set(self.prompt_lengths)) == len(self.prompt_lengths),
            "prompt_lengths",
            f"has duplicates: {self.prompt_lengths}",
        )
        require(
            self.kv_cache in KV_CACHE_DTYPE_NAMES,
            "kv_cache",
            f"must be one of {sorted(KV_CACHE_DTYPE_NAMES)}, got {self.kv_cache!r}",
        )
        unknown = sorted(set(self.baselines) - set(BASELINES))
        require(not unknown, "baselines", f"unknown {unknown}; known: {list(BASELINES)}")

    @property
    def longest_run(self) -> int:
        """Positions the longest run occupies: its prompt plus the decoded tokens."""
        return max(self.prompt_lengths) + self.decode_tokens

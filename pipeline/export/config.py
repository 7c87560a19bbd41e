"""The export stage's config: where the converted model is, and what the checks demand."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.configbase import require


@dataclass
class ExportStageConfig:
    quantized: str  # QAT's converted model (quantized/model.safetensors)
    tokenizer: str  # tokenizer.json of the mix stage
    prompts_mixture: str  # held-out prompts come from this mixture's val split
    out_dir: str = "outputs/export"
    max_context: int = 256  # KV-cache positions of the .pte (prompt + generated tokens)
    prompts: int = 4  # held-out prompts the checks run
    prompt_tokens: int = 48  # tokens per prompt
    min_cosine: float = 0.99  # per position, every artifact against the eager converted model
    min_sqnr_db: float = 15.0  # see conf/stage/export.yaml
    greedy_tokens: int = 16  # greedy generations must agree this far
    hf_max_abs_diff: float = 1e-4  # HF directory against the FP32 weights it holds

    def __post_init__(self) -> None:
        for key in ("quantized", "tokenizer", "prompts_mixture", "out_dir"):
            require(bool(getattr(self, key)), key, "must be a non-empty path")
        for key in ("max_context", "prompts", "prompt_tokens", "greedy_tokens"):
            value = getattr(self, key)
            require(isinstance(value, int) and value >= 1, key, f"must be a positive int, got {value!r}")
        require(self.prompt_tokens >= 2, "prompt_tokens", "must be >= 2 (prefill-then-decode splits a prompt)")
        require(
            self.prompt_tokens + self.greedy_tokens <= self.max_context,
            "max_context",
            f"{self.max_context} cannot hold a prompt of {self.prompt_tokens} tokens plus "
            f"{self.greedy_tokens} generated ones",
        )
        require(0 < self.min_cosine <= 1, "min_cosine", "must be in (0, 1]")
        require(self.hf_max_abs_diff > 0, "hf_max_abs_diff", "must be > 0")

"""The export stage's config: where the converted model is, and what the checks demand."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.configbase import require

# The KV cache's element types (torch dtypes by these names: pipeline/export/kv_cache.py).
# Names only, so that validating a config never imports torch.
KV_CACHE_DTYPE_NAMES = ("float32", "float16", "bfloat16", "int8")
# The routed experts' forms in the program (pipeline/export/program.py: SparseMoE).
MOE_FORMS = ("fused", "xnnpack")


@dataclass
class ExportStageConfig:
    quantized: str  # QAT's converted model (quantized/model.safetensors)
    tokenizer: str  # tokenizer.json of the mix stage
    prompts_mixture: str  # held-out prompts come from this mixture's val split
    out_dir: str = "outputs/export"
    max_context: int = 256  # KV-cache positions of the .pte (prompt + generated tokens)
    kv_cache: str = "float32"  # the cache dtype: float32, float16, bfloat16, int8 (pipeline/export/kv_cache.py)
    moe: str = "fused"  # routed experts: fused (the project's kernel) or xnnpack (stock ExecuTorch; program.py)
    prompts: int = 4  # held-out prompts the checks run
    prompt_tokens: int = 48  # tokens per prompt
    # The gate of every artifact against the eager converted model (checks.py, noise.py;
    # the values and how they were measured: conf/stage/export.yaml).
    noise_fraction: float = 0.05  # elements of each INT8 activation rounded one step off
    noise_draws: int = 8  # perturbed eager runs that measure the rounding noise
    max_excess_noise_db: float = 6.0  # over all positions (prefill rows, decode rows)
    trim_fraction: float = 0.02  # rows of largest excess left out of those sums
    # A top-1 flip counts where eager's margin > tie_factor x 2 x the largest logit change
    # the rounding made at that position (smaller margins are ties rounding may break).
    tie_factor: float = 2.0
    greedy_tokens: int = 16  # free-running tokens: greedy agreement (reported), the LLM runner check
    hf_max_abs_diff: float = 1e-4  # HF directory against the FP32 weights it holds

    def __post_init__(self) -> None:
        for key in ("quantized", "tokenizer", "prompts_mixture", "out_dir"):
            require(bool(getattr(self, key)), key, "must be a non-empty path")
        for key in ("max_context", "prompts", "prompt_tokens", "greedy_tokens", "noise_draws"):
            value = getattr(self, key)
            require(isinstance(value, int) and value >= 1, key, f"must be a positive int, got {value!r}")
        require(
            self.kv_cache in KV_CACHE_DTYPE_NAMES,
            "kv_cache",
            f"must be one of {sorted(KV_CACHE_DTYPE_NAMES)}, got {self.kv_cache!r}",
        )
        require(self.moe in MOE_FORMS, "moe", f"must be one of {list(MOE_FORMS)}, got {self.moe!r}")
        require(self.prompt_tokens >= 2, "prompt_tokens", "must be >= 2 (prefill-then-decode splits a prompt)")
        require(
            self.prompt_tokens + self.greedy_tokens <= self.max_context,
            "max_context",
            f"{self.max_context} cannot hold a prompt of {self.prompt_tokens} tokens plus "
            f"{self.greedy_tokens} generated ones",
        )
        require(0 < self.noise_fraction <= 1, "noise_fraction", f"must be in (0, 1], got {self.noise_fraction}")
        require(self.tie_factor >= 1, "tie_factor", f"must be >= 1, got {self.tie_factor}")
        require(0 <= self.trim_fraction < 0.5, "trim_fraction", f"must be in [0, 0.5), got {self.trim_fraction}")
        require(self.hf_max_abs_diff > 0, "hf_max_abs_diff", "must be > 0")

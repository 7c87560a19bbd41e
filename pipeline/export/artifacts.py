"""The export stage's work, without Ray or tracking: write the three artifacts, check them.

``export_all`` reads the converted model, writes ``model.pt2``, ``model.pte``, ``hf/``
and ``operators.json`` into a directory, runs every check and returns the metrics
(sizes, equivalence numbers, the operator and expert tables). It raises
:class:`ExportCheckError` naming each failed check; timings are returned apart (they
must not enter files DVC hashes).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.data.mixing import load_split
from pipeline.data.tokenizer import BOS, EOS, PAD, Tokenizer
from pipeline.export.checks import Gate, compare, exact_compare
from pipeline.export.config import ExportStageConfig
from pipeline.export.llm_runner import llm_runner_parity
from pipeline.export.noise import noise_floor
from pipeline.export.runner import EagerRunner, HFRunner, Pt2Runner, PteRunner


class ExportCheckError(RuntimeError):
    """An exported artifact does not compute what the eager model computes; ``details``
    holds every failed check's numbers (the stage's MLflow run records them)."""

    def __init__(self, message: str, details: dict) -> None:
        super().__init__(message)
        self.details = details

    def __reduce__(self):  # through Ray's pickling with its details
        return (type(self), (str(self), self.details))


def held_out_prompts(mixture_dir: Path, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens, evenly spaced over the val split (real text,
    never seen in training)."""
    tokens, _ = load_split(mixture_dir, "val")
    if len(tokens) < length:
        raise ValueError(f"{mixture_dir}: val split has {len(tokens)} tokens, fewer than one prompt of {length}")
    starts = np.linspace(0, len(tokens) - length, n).astype(np.int64)
    return [tokens[s : s + length].astype(np.int64).tolist() for s in starts]


def export_all(cfg: ExportStageConfig, quantized: Path, tokenizer_path: Path, prompts_dir: Path, out: Path):
    """Write and check every artifact in ``out``; returns (metrics, seconds)."""
    import torch

    from pipeline.export.hf import dequantized, load_hf, save_hf
    from pipeline.export.lower import (
        INT4_GEMM_OP,
        INT8_ACTIVATION_OP,
        expected_int4_gemms,
        expected_project_kernels,
        expert_weight_table,
        export_program,
        lower_to_pte,
        save_pt2,
    )
    from pipeline.export.program import ExportableLM, ExportInputError
    from pipeline.quant.format import load_quantized

    torch.manual_seed(0)
    seconds: dict[str, float] = {}
    model, q = load_quantized(quantized)
    tokenizer = Tokenizer.load(tokenizer_path)
    prompts = held_out_prompts(prompts_dir, cfg.prompts, cfg.prompt_tokens)
    gate = Gate(cfg.max_excess_noise_db, cfg.trim_fraction, cfg.tie_factor, cfg.greedy_tokens)

    started = time.perf_counter()
    if cfg.max_context > model.cfg.max_seq_len:
        raise ExportInputError(
            f"stage.export.max_context={cfg.max_context} is above the model's max_seq_len={model.cfg.max_seq_len}"
        )
    # The last position's logits only, what a generating runner (ExecuTorch's, the eval's,
    # the profile's) needs: a head over every prompt position would dominate prefill at a
    # large vocabulary. The checks prefill every prefix instead (checks.teacher_forced).
    program = ExportableLM(model, cfg.max_context, last_logits_only=True, kv_cache=cfg.kv_cache, moe=cfg.moe)
    exported = export_program(program)
    save_pt2(exported, out / "model.pt2")
    seconds["export"] = time.perf_counter() - started

    started = time.perf_counter()
    meta = {
        "max_context": cfg.max_context,
        "vocab_size": model.cfg.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }
    lowered = lower_to_pte(exported, meta)
    lowered.write(out / "model.pte")
    seconds["lower"] = time.perf_counter() - started
    experts = expert_weight_table(program)
    (out / "operators.json").write_text(json.dumps({"operators": lowered.operators, "experts": experts}, indent=2))

    started = time.perf_counter()
    full_precision = dequantized(model)
    special = {"bos": BOS, "eos": EOS, "pad": PAD}
    save_hf(full_precision, out / "hf", tokenizer_path, special, {"scheme": asdict(q), "weights": "dequantized"})
    seconds["hf"] = time.perf_counter() - started

    started = time.perf_counter()
    eager = EagerRunner(model, cfg.max_context)
    floor = noise_floor(model, prompts, cfg.noise_draws, cfg.noise_fraction)
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(out / "hf"), dtype=torch.float32)
    pte = PteRunner(out / "model.pte")
    checks = {
        "pte": compare(floor, eager, pte, prompts, gate),
        "pt2": compare(floor, eager, Pt2Runner(out / "model.pt2", cfg.max_context), prompts, gate),
        # The HF directory holds the dequantized weights: against the FP32 eager model
        # with the same weights it must agree to float summation order.
        "hf_vs_fp32": exact_compare(
            EagerRunner(full_precision, cfg.max_context),
            HFRunner(hf_model, cfg.max_context),
            prompts,
            cfg.hf_max_abs_diff,
        ),
        # The same directory against the INT8-activation model: apart by activation
        # rounding only (about 2 dB above the floor: rounding every element to the nearest
        # step is as noisy as moving 5% of them by one). A wrong dequantization, which the
        # check above shares with its reference, shows here.
        "hf_vs_int8": compare(floor, eager, HFRunner(hf_model, cfg.max_context), prompts, gate),
    }
    reread = load_hf(out / "hf")
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        reread_diff = float((reread(ids) - full_precision(ids)).abs().max())
    checks["hf_reader"] = {"max_abs_logit_diff": reread_diff, "passed": reread_diff < cfg.hf_max_abs_diff}
    checks["pte_metadata"] = {**pte.metadata, "passed": pte.metadata == meta}
    checks["llm_runner"] = llm_runner_parity(
        out / "model.pte",
        tokenizer_path,
        tokenizer,
        model,
        prompts,
        cfg.greedy_tokens,
        cfg.max_context,
        cfg.noise_fraction,
        cfg.noise_draws,
        cfg.tie_factor,
    )
    ops = lowered.operators
    expected = expected_int4_gemms(model.cfg, cfg.moe)
    kernels = {op: ops["portable"].get(op, 0) for op in expected_project_kernels(model.cfg, cfg.moe)}
    checks["sparse_int4"] = {
        "portable_compute": ops["portable_compute"],
        # Every linear, expert and head 8da4w (INT4 weights, INT8 activations per token):
        # a layer left in full precision, or one whose activations are not quantized,
        # shows here on every machine, also where its numeric effect is within rounding noise.
        "int4_gemms": ops["delegated"].get(INT4_GEMM_OP, 0),
        "int8_activations": ops["delegated"].get(INT8_ACTIVATION_OP, 0),
        "expected": expected,
        # The fused form's routed experts (one node per MoE layer) and tied table.
        "project_kernels": kernels,
        "expected_project_kernels": expected_project_kernels(model.cfg, cfg.moe),
        "passed": not ops["portable_compute"]
        and kernels == expected_project_kernels(model.cfg, cfg.moe)
        and ops["delegated"].get(INT4_GEMM_OP, 0) == expected
        and ops["delegated"].get(INT8_ACTIVATION_OP, 0) == expected,
    }
    seconds["checks"] = time.perf_counter() - started

    sample = greedy_text(pte, tokenizer, prompts[0], cfg.greedy_tokens)
    (out / "sample.json").write_text(json.dumps(sample, indent=2))
    metrics = {
        "bytes": {
            "pte": (out / "model.pte").stat().st_size,
            "pt2": (out / "model.pt2").stat().st_size,
            "hf": sum(p.stat().st_size for p in (out / "hf").iterdir()),
            "quantized_input": quantized.stat().st_size,
        },
        "checks": checks,
        "operators": {
            "delegate_calls": ops["delegate_calls"],
            "delegated_ops": sum(ops["delegated"].values()),
            "portable_ops": sum(ops["portable"].values()),
        },
        "experts": experts[0] if experts else {},
        "max_context": cfg.max_context,
        "prompts": len(prompts),
        "prompt_tokens": cfg.prompt_tokens,
    }
    failed = {name: c for name, c in checks.items() if not c["passed"]}
    if failed:
        raise ExportCheckError(
            "export checks failed: " + "; ".join(f"{name}: {json.dumps(c)}" for name, c in failed.items()), failed
        )
    return metrics, seconds


def greedy_text(runner, tokenizer: Tokenizer, prompt: list[int], new_tokens: int) -> dict:
    from pipeline.export.runner import greedy

    out = greedy(runner, prompt, new_tokens, tokenizer.eos_id)
    return {"prompt": tokenizer.decode(prompt), "completion": tokenizer.decode(out), "tokens": out}

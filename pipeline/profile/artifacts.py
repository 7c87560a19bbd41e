"""The profile stage's work, without Ray or tracking: build the dense twins' programs,
time every program side by side, and write the report.

``profile_all`` writes into ``out``: ``programs/<twin>.pte`` (a function of the config:
cacheable), ``profile.json``, ``report.md``, ``plots/`` and ``metrics.json`` (timings
and the machine: never cached by DVC). It returns the metrics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.export.budget import available_bytes
from pipeline.export.kv_cache import kv_element_bytes
from pipeline.model.accounting import decode_read_bytes, param_counts
from pipeline.model.config import ModelConfig
from pipeline.model.twins import dense_twin
from pipeline.profile.config import ProfileStageConfig
from pipeline.profile.programs import LoadedProgram, ProgramError, load_program
from pipeline.profile.report import markdown, plot_expert_load, plot_throughput
from pipeline.profile.routing import decode_expert_load, load_summary
from pipeline.profile.runner_stats import runner_timings
from pipeline.profile.session import profile_interleaved, speedups, summarize
from pipeline.profile.stats import timed_generation
from pipeline.profile.system import PeakMemory, machine, read_bandwidth_gb_s, set_threads
from pipeline.profile.twin_build import TwinSpec, build_twins, concurrency

KEY = "stage.profile"


def distinct_prompts(mixture_dir: Path, n: int, length: int) -> list[list[int]]:
    """``n`` held-out windows of ``length`` tokens that do not overlap (each run sees
    other text); ValueError naming ``stage.profile.repeats`` when the val split is short."""
    from pipeline.data.mixing import load_split
    from pipeline.export.artifacts import held_out_prompts

    tokens, _ = load_split(mixture_dir, "val")
    if len(tokens) < n * length:
        raise ValueError(
            f"{KEY}.repeats: {n} runs (warm-up included) of {length} tokens need {n * length} distinct held-out "
            f"tokens, but {mixture_dir}'s val split has {len(tokens)}"
        )
    return held_out_prompts(mixture_dir, n, length)


def decode_positions(prompt: int, decode_tokens: int) -> int:
    """KV positions a measured decode step reads on average: the prompt and half the
    ``decode_tokens`` decoded after it (the bound's KV term at that prompt length)."""
    return prompt + decode_tokens // 2


def check_cache_dtype(program_path: Path, cfg: ProfileStageConfig) -> None:
    """ProgramError unless ``stage.profile.kv_cache`` agrees with the program where the
    program shows it: an INT8 cache is the one that calls ``custom_quantized_sdpa``.
    (FP32 and the 16-bit caches call the same op: those cannot be told apart here.)"""
    from pipeline.export.kernels import read_requirements

    ops = {op for lib in read_requirements(program_path)["kernel_libraries"] for op in lib["operators"]}
    quantized = "llama::custom_quantized_sdpa.out" in ops
    if quantized != (cfg.kv_cache == "int8"):
        raise ProgramError(
            f"{KEY}.kv_cache={cfg.kv_cache!r}, but {program_path} {'has' if quantized else 'does not have'} "
            "an INT8 KV cache: set it to the program's cache (stage.export.kv_cache)"
        )


def check_room(program: LoadedProgram, cfg: ProfileStageConfig) -> None:
    """ProgramError unless the longest run (prompt + decoded tokens) fits the program."""
    if cfg.longest_run > program.max_context:
        raise ProgramError(
            f"{KEY}.prompt_lengths: a {max(cfg.prompt_lengths)}-token prompt plus {cfg.decode_tokens} decoded "
            f"tokens needs {cfg.longest_run} positions, but {program.path} holds {program.max_context} "
            "(its max_context)"
        )


def _peak_memory_of(path: str, prompt: list[int], continuation: list[int], threads: int) -> dict[str, float]:
    """In a fresh process: load the program, run one generation; its resident memory
    before loading and at its peak (MiB)."""
    import executorch.kernels.quantized  # noqa: F401 - libraries loaded before the meter starts
    import executorch.runtime  # noqa: F401

    set_threads(threads)
    with PeakMemory() as memory:
        program = load_program(Path(path))
        timed_generation(program.logits, prompt, continuation)
    return {"peak_rss_mib": memory.peak_mib, "peak_rss_increment_mib": memory.increment_mib}


def measure_memory(path: Path, window: list[int], cfg: ProfileStageConfig) -> dict[str, float]:
    """Peak resident memory of a process that runs only this program (its longest
    generation), and how much of it the program added: measured in a spawned process,
    so neither the other programs nor the twins' lowering inflate it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    longest = max(cfg.prompt_lengths)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(
            _peak_memory_of, str(path), window[:longest], window[longest : cfg.longest_run], cfg.threads
        ).result()


def _load_checked(path: Path, cfg: ProfileStageConfig) -> LoadedProgram:
    program = load_program(path)
    check_room(program, cfg)
    return program


def program_entry(
    model_cfg: ModelConfig, program: LoadedProgram, memory: dict[str, float], cfg: ProfileStageConfig
) -> dict:
    """What the report says of one program: sizes, memory, and per prompt length the
    bytes an ideal decode step reads (the bound's denominator).

    Ideal: the active INT4 weights, and the KV cache of the positions filled during the
    measured decode (prompt + half the decoded tokens, on average), a windowed layer at
    most its window, at the cache's dtype (an INT8 cache also reads its per-head FP32
    scale and INT8 zero point). The program reads exactly that on its global layers
    (``custom_sdpa`` stops at the filled positions) and its whole cache on windowed ones
    (the masked kernel has no start position): that excess counts against it."""
    counts = param_counts(model_cfg)
    element = kv_element_bytes(cfg.kv_cache, model_cfg.head_dim)
    read = {
        str(n): decode_read_bytes(
            model_cfg, decode_positions(n, cfg.decode_tokens), group_size=cfg.group_size, kv_dtype_bytes=element
        )
        for n in cfg.prompt_lengths
    }
    return {
        "config": model_cfg.name,
        "params_total": counts.total,
        "params_active": counts.active,
        "pte_bytes": program.path.stat().st_size,
        "full_logits": program.full_logits,
        **memory,
        "decode_read_bytes": read,
    }


def profile_all(
    cfg: ProfileStageConfig,
    model_cfg: ModelConfig,
    program_path: Path,
    quantized: Path,
    prompts_dir: Path,
    tokenizer_json: Path,
    out: Path,
) -> tuple[dict, dict[str, float]]:
    """Profile the exported MoE and its dense twins; returns (metrics, seconds)."""
    from pipeline.data.tokenizer import Tokenizer
    from pipeline.quant.format import load_quantized

    tokenizer = Tokenizer.load(tokenizer_json)
    seconds: dict[str, float] = {}
    set_threads(cfg.threads, f"{KEY}.threads")
    windows = distinct_prompts(prompts_dir, cfg.warmup + cfg.repeats, cfg.longest_run)
    bandwidth = read_bandwidth_gb_s(cfg.bandwidth_mib, cfg.threads)

    programs: dict[str, LoadedProgram] = {}
    entries: dict[str, dict] = {}
    moe = _load_checked(program_path, cfg)
    if moe.metadata["vocab_size"] != model_cfg.vocab_size:
        raise ProgramError(
            f"{program_path}: vocab_size {moe.metadata['vocab_size']} differs from model.vocab_size "
            f"{model_cfg.vocab_size} (a program of another model?)"
        )
    check_cache_dtype(program_path, cfg)

    # The twins first, side by side in processes of their own (twin_build), so that no
    # lowering runs while anything is timed.
    (out / "programs").mkdir(parents=True, exist_ok=True)
    twins = {b: dense_twin(model_cfg, b.removeprefix("dense_"), multiple=cfg.group_size) for b in cfg.baselines}
    specs = [
        TwinSpec(
            twin,
            cfg.group_size,
            cfg.seed + i,
            moe.max_context,
            last_logits_only=not moe.full_logits,
            bos_id=moe.metadata["bos_id"],
            eos_id=moe.metadata["eos_id"],
            kv_cache=cfg.kv_cache,
            path=out / "programs" / f"{baseline}.pte",
        )
        for i, (baseline, twin) in enumerate(twins.items())
    ]
    started = time.perf_counter()
    lowered = build_twins(specs, concurrency(specs, cfg.threads, available_bytes()))
    # Each twin's seconds (from a child: its start-up included), and all of them: the wall.
    seconds |= {f"lower_{baseline}": lowered[spec.path] for baseline, spec in zip(twins, specs, strict=True)}
    seconds["lower_twins"] = time.perf_counter() - started

    runner = runner_timings(
        program_path,
        tokenizer_json,
        {n: [tokenizer.decode(w[:n]) for w in windows[cfg.warmup :]] for n in cfg.prompt_lengths},
        cfg.decode_tokens,
    )
    memory = measure_memory(program_path, windows[0], cfg)
    programs["moe"], entries["moe"] = moe, program_entry(model_cfg, moe, memory, cfg)
    for (baseline, twin), spec in zip(twins.items(), specs, strict=True):
        programs[baseline] = _load_checked(spec.path, cfg)
        memory = measure_memory(spec.path, windows[0], cfg)
        entries[baseline] = program_entry(twin, programs[baseline], memory, cfg)

    started = time.perf_counter()
    samples = profile_interleaved(
        {name: p.logits for name, p in programs.items()}, windows, cfg.prompt_lengths, cfg.decode_tokens, cfg.warmup
    )
    seconds["profile"] = time.perf_counter() - started
    summary = summarize(samples)
    for name, entry in entries.items():
        entry["decode_bound_tok_s"] = {
            n: bandwidth["gb_s"] * 1e9 / read["total"] for n, read in entry["decode_read_bytes"].items()
        }
        entry["decode_fraction_of_bound"] = {
            n: c["decode_tok_s"]["median"] / entry["decode_bound_tok_s"][n] for n, c in summary[name].items()
        }

    model, _ = load_quantized(quantized)
    longest = max(cfg.prompt_lengths)
    measured = windows[cfg.warmup :]
    counts_LE = decode_expert_load(
        model, [(w[:longest], w[longest : cfg.longest_run]) for w in measured], moe.max_context
    )

    profile = {
        "machine": machine(cfg.threads),
        "bandwidth": bandwidth,
        "runs": cfg.repeats,
        "warmup": cfg.warmup,
        "prompt_lengths": cfg.prompt_lengths,
        "decode_tokens": cfg.decode_tokens,
        "programs": entries,
        "summary": summary,
        "speedups": {b: speedups(samples, "moe", b) for b in cfg.baselines},
        "runner": {str(n): r for n, r in runner.items()},
        "expert_load": {"counts": counts_LE.tolist(), **load_summary(counts_LE, model_cfg.moe.top_k)},
        "samples": {n: {str(k): [s.as_dict() for s in v] for k, v in d.items()} for n, d in samples.items()},
        "note": None
        if not moe.full_logits
        else (
            "Every program returns logits for every prompt position (the export stage's checks compare them "
            "all), so prefill includes the output head on each prompt token, for the MoE and the twins alike."
        ),
    }
    write_outputs(profile, counts_LE.tolist(), out)
    return metrics_of(profile), seconds


def metrics_of(profile: dict) -> dict:
    """The DVC/MLflow metrics: speed-ups per baseline and length, the MoE's medians, the
    bandwidth and the fraction of the decode bound reached, the expert-load summary."""
    moe = profile["programs"]["moe"]
    return {
        "speedup": profile["speedups"],
        "moe": {
            metric: {n: c[metric]["median"] for n, c in profile["summary"]["moe"].items()}
            for metric in ("ttft_ms", "prefill_tok_s", "decode_tok_s")
        },
        "decode_fraction_of_bound": {name: p["decode_fraction_of_bound"] for name, p in profile["programs"].items()},
        "runner": {
            metric: {n: r[metric] for n, r in profile["runner"].items() if r[metric] is not None}
            for metric in ("ttft_ms", "prefill_tok_s", "decode_tok_s")
        },
        "bandwidth_gb_s": profile["bandwidth"]["gb_s"],
        "moe_peak_rss_mib": moe["peak_rss_mib"],
        "expert_load": {k: v for k, v in profile["expert_load"].items() if k != "counts"},
    }


def write_outputs(profile: dict, counts_LE: list[list[int]] | None, out: Path) -> None:
    """profile.json, metrics.json, report.md and plots/ into ``out``."""
    (out / "plots").mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(profile, indent=2, sort_keys=True))
    (out / "metrics.json").write_text(json.dumps(metrics_of(profile), indent=2, sort_keys=True))
    (out / "report.md").write_text(markdown(profile))
    plot_throughput(profile, out / "plots" / "throughput.png")
    if counts_LE is not None:
        plot_expert_load(counts_LE, out / "plots" / "expert_load.png")

"""Profiling: the ExecuTorch LLM-runner definitions, paired speed-ups, depth extrapolation,
dense twins, the decode bandwidth bound, the expert load, and one real profile of a micro
MoE against its twins in the ExecuTorch runtime; bad programs, threads and lengths are
refused before any work."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from shapes import MAX_CONTEXT, VOCAB, micro_cfg

from pipeline.model import ModelConfig, Transformer
from pipeline.model.accounting import decode_read_bytes
from pipeline.model.twins import dense_twin
from pipeline.profile.artifacts import profile_all
from pipeline.profile.config import ProfileStageConfig
from pipeline.profile.depth import extrapolate
from pipeline.profile.programs import ProgramError, load_program
from pipeline.profile.routing import decode_expert_load
from pipeline.profile.session import profile_interleaved, speedups
from pipeline.profile.stats import speedup, spread, timed_generation
from pipeline.profile.system import ThreadsError, set_threads, usable_cores
from pipeline.profile.twin_build import TwinSpec, build_twins
from pipeline.recipe import compose, validate
from pipeline.runner.errors import StageInputError
from pipeline.runner.inputs import ProgramInput, ThreadsInput


class FakeProgram:
    """Logits of a program whose run advances a fake clock: ``prefill_ms`` per prompt
    token plus ``overhead_ms`` per call, ``decode_ms`` per single-token call."""

    def __init__(self, clock: list[float], prefill_ms: float, decode_ms: float, overhead_ms: float, log=None):
        self.clock, self.prefill_ms, self.decode_ms, self.overhead_ms = clock, prefill_ms, decode_ms, overhead_ms
        self.calls: list[tuple[list[int], int]] = []
        self.log = log

    def __call__(self, tokens: list[int], start: int) -> torch.Tensor:
        self.calls.append((list(tokens), start))
        if self.log is not None:
            self.log.append(self)
        cost = self.decode_ms if len(tokens) == 1 and start > 0 else self.prefill_ms * len(tokens) + self.overhead_ms
        self.clock[0] += cost / 1e3
        return torch.zeros(len(tokens), 8)


def _clock(now: list[float]):
    return lambda: now[0]


def test_timed_generation_follows_the_executorch_runner_definitions():
    now = [100.0]
    program = FakeProgram(now, prefill_ms=0.25, decode_ms=4.0, overhead_ms=3.0)
    prompt, continuation = list(range(10, 50)), [7, 8, 9, 11, 12]
    s = timed_generation(program, prompt, continuation, _clock(now))
    # prefill: 40 tokens * 0.25 ms + 3 ms = 13 ms; decode: 5 steps * 4 ms = 20 ms
    assert s.ttft_ms == pytest.approx(13.0)
    assert s.prefill_tok_s == pytest.approx(40 / 0.013)
    assert s.decode_tok_s == pytest.approx(5 / 0.020)
    assert (s.num_prompt_tokens, s.num_generated_tokens) == (40, 5)
    assert s.first_token == s.prompt_eval_end  # stamped together, as the runner does
    # Teacher forcing: each decode step feeds the held-out continuation at the next position.
    assert program.calls[0] == (prompt, 0)
    assert program.calls[1:] == [([t], 40 + i) for i, t in enumerate(continuation)]


def test_spread_and_paired_speedups_by_hand():
    s = spread([10.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["p25"], s["p75"], s["runs"]) == (3.0, 2.0, 4.0, 5)
    # Paired ratios 2, 4, 2 -> median 2 (the ratio of medians would be 4/1 = 4).
    assert speedup([2.0, 4.0, 6.0], [1.0, 1.0, 3.0]) == pytest.approx(2.0)
    # Latencies: the dense over the MoE, 2 and 3 -> 2.5.
    assert speedup([1.0, 2.0], [2.0, 6.0], higher_is_better=False) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="paired"):
        speedup([1.0], [1.0, 2.0])


def test_interleaved_runs_rotate_the_order_share_prompts_and_drop_the_warmup():
    now, log = [0.0], []
    programs = {
        "moe": FakeProgram(now, 0.1, 1.0, 0.0, log),
        "dense": FakeProgram(now, 0.3, 3.0, 0.0, log),
        "other": FakeProgram(now, 0.2, 2.0, 0.0, log),
    }
    windows = [[w * 100 + i for i in range(30)] for w in range(4)]
    samples = profile_interleaved(programs, windows, [8, 20], decode_tokens=6, warmup=1, clock=_clock(now))
    firsts = [log[i] for i in range(0, len(log), 7)]  # 1 prefill + 6 decode calls per run
    names = {id(p): n for n, p in programs.items()}
    # the measured windows (after the warm-up one) start with each program in turn
    assert [names[id(p)] for p in firsts[::3]] == ["other", "other", "moe", "moe", "dense", "dense", "other", "other"]
    for name, program in programs.items():
        prompts = [c for c in program.calls if c[1] == 0]
        assert prompts == [(w[:n], 0) for w in windows for n in (8, 20)], name  # same prompts for all
        assert [len(samples[name][n]) for n in (8, 20)] == [3, 3]  # warm-up window dropped
    s = speedups(samples, "moe", "dense")
    assert s["decode"]["8"] == pytest.approx(3.0) and s["prefill"]["20"] == pytest.approx(3.0)
    assert s["ttft"]["20"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="fewer than"):
        profile_interleaved(programs, [[1, 2, 3]], [8], 6, 0, _clock(now))


def test_speedups_pair_runs_of_the_same_window():
    """Costs drift from window to window (a busy machine): only the ratio of runs on the
    same window is constant, so any other pairing would move the median."""

    class Drifting(FakeProgram):
        def __call__(self, tokens, start):
            window = tokens[0] // 100 if start == 0 else self.window
            self.window = window
            scale = (1, 5, 2, 7, 3)[window]
            self.clock[0] += scale * (self.decode_ms if start else self.prefill_ms * len(tokens)) / 1e3
            return torch.zeros(len(tokens), 8)

    now = [0.0]
    programs = {"moe": Drifting(now, 0.1, 1.0, 0.0), "dense": Drifting(now, 0.3, 3.0, 0.0)}
    windows = [[w * 100 + i for i in range(30)] for w in range(5)]
    samples = profile_interleaved(programs, windows, [8], decode_tokens=4, warmup=0, clock=_clock(now))
    s = speedups(samples, "moe", "dense")
    assert s["decode"]["8"] == pytest.approx(3.0) and s["prefill"]["8"] == pytest.approx(3.0)
    shifted = [samples["dense"][8][(i + 1) % 5].decode_tok_s for i in range(5)]
    assert speedup([x.decode_tok_s for x in samples["moe"][8]], shifted) != pytest.approx(3.0)


def test_verdict_counts_prefill_and_decode_and_names_the_baseline():
    from pipeline.profile.report import verdict

    def s(prefill, decode):
        return {"prefill": {"8": 9.0, "64": prefill}, "decode": {"8": 9.0, "64": decode}, "ttft": {"64": prefill}}

    assert verdict(s(1.5, 2.0), "dense_total").startswith("The MoE beats the dense, same total params")
    assert "prefill 1.50x (faster), decode 2.00x (faster)" in verdict(s(1.5, 2.0), "dense_total")
    assert verdict(s(0.8, 2.0), "dense_active").startswith("The MoE partly beats the dense, same active")
    assert verdict(s(0.8, 0.9), "dense_total").startswith("The MoE does not beat")
    assert "at a 64-token prompt" in verdict(s(0.8, 0.9), "dense_total")  # the longest, not the last key


def test_uniform_routing_noise_floor():
    from pipeline.profile.routing import load_summary, uniform_max_over_mean

    assert uniform_max_over_mean(60, 4, 20000, 1, trials=5) < 1.1  # many tokens: even
    assert 1.5 < uniform_max_over_mean(60, 4, 160, 2) < 2.1  # a few hundred: visibly uneven
    counts = torch.tensor([[4, 0, 2, 2], [2, 2, 2, 2]])  # top-2, 5 steps
    summary = load_summary(counts, top_k=2)
    assert summary["decode_steps"] == 4 and summary["experts_touched_fraction"] == 7 / 8
    assert summary["max_over_mean_load"] == pytest.approx((2.0 + 1.0) / 2)


def test_depth_extrapolation_recovers_a_linear_cost():
    # TTFT = 5 + 3 n ms, decode = 2 + 0.5 n ms/token: at 20 layers 65 ms and 12 ms.
    by_depth = {n: {"ttft_ms": 5 + 3 * n, "decode_tok_s": 1e3 / (2 + 0.5 * n)} for n in (1, 2, 4)}
    x = extrapolate(by_depth, prompt_tokens=130, full_layers=20)
    assert x["ttft_ms"] == pytest.approx(65.0)
    assert x["prefill_tok_s"] == pytest.approx(130 / 0.065)
    assert x["decode_tok_s"] == pytest.approx(1e3 / 12)
    assert x["ttft_ms_per_layer"] == pytest.approx(3.0) and x["decode_ms_per_token_fixed"] == pytest.approx(2.0)
    assert x["fit_max_relative_residual"] == pytest.approx(0.0, abs=1e-12)
    by_depth[4]["ttft_ms"] *= 1.5  # not linear: the residual says so
    assert extrapolate(by_depth, 130, 20)["fit_max_relative_residual"] > 0.1
    with pytest.raises(ValueError, match="two or more"):
        extrapolate({3: by_depth[1]}, 130, 20)


def test_dense_twins_equal_the_hand_derived_configs():
    def load_model_config(name: str) -> ModelConfig:
        return validate(compose([f"model={name}"])).model

    tiny = load_model_config("tiny")
    for match in ("total", "active"):
        want = asdict(load_model_config(f"tiny_dense_{match}"))
        got = asdict(dense_twin(tiny, match, multiple=32))
        assert {**got, "name": None} == {**want, "name": None}, match
    # micro: slot = 4*3*64*32 + 3*64*64 + 64*4 = 37120 = 193.3 columns of 3*64 -> 192.
    micro = micro_cfg()
    assert dense_twin(micro, "total", multiple=32).ffn_dim == 192
    assert dense_twin(micro, "total", multiple=64).ffn_dim == 192
    assert dense_twin(micro, "total", multiple=128).ffn_dim == 128
    assert dense_twin(micro, "active").ffn_dim == 2 * 32 + 64
    with pytest.raises(ValueError, match="dense already"):
        dense_twin(dense_twin(micro, "active"), "total")
    with pytest.raises(ValueError, match="rounds to ffn_dim 0"):
        dense_twin(micro, "total", multiple=256)


def _naive_decode_bytes(cfg: ModelConfig, group: int, scale: int, norm: int, kv_bytes: int, positions: int) -> int:
    """Bytes one decode step reads, tensor by tensor over the built model."""
    with torch.device("meta"):
        model = Transformer(cfg)

    def int4(n: int) -> float:
        return n / 2 + n / group * scale

    total = 0.0
    for name, p in model.named_parameters():
        n = p.numel()
        if "router" in name:
            total += 4 * n
        elif p.ndim == 1:
            total += norm * n
        elif "experts" in name:
            total += int4(n * cfg.moe.top_k // cfg.moe.num_experts)
        elif name == "embed.weight":
            total += int4(cfg.d_model) + (int4(n) if cfg.tie_embeddings else 0)
        else:
            total += int4(n)
    cached = sum(min(positions, cfg.layer_window(i) or positions) for i in range(cfg.n_layers))
    return int(total + 2 * cfg.n_kv_heads * cfg.head_dim * kv_bytes * cached)


@pytest.mark.parametrize(
    "cfg",
    [
        micro_cfg(),
        micro_cfg(tie_embeddings=False, n_layers=4, sliding_window=8, global_every=2),
        dense_twin(micro_cfg(), "total"),
    ],
    ids=["moe", "untied-windowed", "dense"],
)
def test_decode_read_bytes_equal_a_count_over_the_built_model(cfg):
    got = decode_read_bytes(cfg, 40, group_size=16, scale_bytes=4, norm_bytes=1, kv_dtype_bytes=4)
    assert got["total"] == _naive_decode_bytes(cfg, 16, 4, 1, 4, 40)
    assert got["total"] == got["weights"] + got["kv_cache"]


def test_expert_load_counts_decode_steps_only_and_follows_the_router():
    torch.manual_seed(0)
    model = Transformer(micro_cfg()).eval()
    runs = [(list(range(5, 25)), [30, 31, 32, 33, 34, 35]), (list(range(40, 50)), [60, 61, 62])]
    counts = decode_expert_load(model, runs, MAX_CONTEXT)
    assert counts.shape == (2, 4)
    assert counts.sum(dim=1).tolist() == [2 * 9, 2 * 9]  # top-2 x 9 decode steps, prefill not counted
    for moe in model.moe_layers():  # a bias that forces experts 1 and 3
        moe.router.expert_bias_E.copy_(torch.tensor([0.0, 10.0, 0.0, 10.0]))
    counts = decode_expert_load(model, runs, MAX_CONTEXT)
    assert counts[:, [0, 2]].sum() == 0 and counts[:, [1, 3]].tolist() == [[9, 9], [9, 9]]


def test_router_balancing_spreads_load_with_the_recipe_updates_and_leaves_weights_alone():
    from pipeline.profile.programs import balance_router

    torch.manual_seed(0)
    model = Transformer(micro_cfg())
    for moe in model.moe_layers():  # degenerate: expert 0 wins every token
        moe.router.expert_bias_E.copy_(torch.tensor([0.3, 0.0, 0.0, 0.0]))
    before = {k: v.clone() for k, v in model.state_dict().items() if "expert_bias" not in k}
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (2, 32), generator=gen) for _ in range(30)]
    history = balance_router(model, batches, rate=0.02)
    # 2.0: expert 0 takes every token (top-2 of 4); balanced to ~1.3 (64 tokens a batch are noisy)
    assert len(history) == 30 and history[0] == 2.0 and sum(history[-10:]) / 10 < 1.5, history
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # only the biases moved
    for moe in model.moe_layers():
        assert moe.router.cfg.bias_update_rate == micro_cfg().moe.bias_update_rate
        assert moe.router.expert_bias_E[0] < 0.3 and not moe.training


@pytest.fixture(scope="module")
def micro_program(lowered) -> tuple[Path, Path]:
    """The shared micro MoE program (conftest: the last position's logits) and its weights."""
    return lowered["dir"] / "model.pte", lowered["dir"] / "model.safetensors"


@pytest.fixture(scope="module")
def profiled(micro_program, micro_data, tmp_path_factory) -> tuple[Path, dict, ProfileStageConfig]:
    path, quantized = micro_program
    out = tmp_path_factory.mktemp("profile")
    cfg = ProfileStageConfig(
        program=str(path),
        quantized=str(quantized),
        prompts_mixture=str(micro_data / "pretrain"),
        tokenizer=str(micro_data / "tokenizer" / "tokenizer.json"),
        threads=1,
        prompt_lengths=[6, 24],
        decode_tokens=5,
        warmup=1,
        repeats=3,
        bandwidth_mib=16,
        baselines=["dense_total"],  # one twin keeps the fixture cheap; the stage default runs both
    )
    metrics, _ = profile_all(
        cfg, micro_cfg(), path, quantized, micro_data / "pretrain", micro_data / "tokenizer" / "tokenizer.json", out
    )
    return out, metrics, cfg


@pytest.mark.slow  # the whole profile stage's work on the micro program and its twin
def test_profile_writes_the_report_and_its_numbers_follow_from_the_runs(profiled, micro_program):
    out, metrics, cfg = profiled
    profile = json.loads((out / "profile.json").read_text())
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    for item in ("report.md", "plots/throughput.png", "plots/expert_load.png"):
        assert (out / item).stat().st_size > 0, item
    report = (out / "report.md").read_text()
    assert "equal INT4 memory" in report
    assert re.search(r"The MoE (beats|partly beats|does not beat) the dense, same total params", report)
    # The twins: the MoE's context and logits form, their configs' own parameter counts.
    moe = load_program(micro_program[0])
    for baseline in cfg.baselines:
        twin = load_program(out / "programs" / f"{baseline}.pte")
        assert twin.max_context == moe.max_context and twin.full_logits == moe.full_logits is False
        want = dense_twin(micro_cfg(), baseline.removeprefix("dense_"), 32)
        assert profile["programs"][baseline]["config"] == want.name
    # Recompute the decode speed-up from the raw timestamps, independently of session.py.
    for baseline in cfg.baselines:
        for n in map(str, cfg.prompt_lengths):
            ratios = sorted(
                (m["num_generated_tokens"] / (m["inference_end"] - m["prompt_eval_end"]))
                / (d["num_generated_tokens"] / (d["inference_end"] - d["prompt_eval_end"]))
                for m, d in zip(profile["samples"]["moe"][n], profile["samples"][baseline][n], strict=True)
            )
            assert len(ratios) == cfg.repeats
            assert metrics["speedup"][baseline]["decode"][n] == pytest.approx(ratios[len(ratios) // 2])
    # The bound: bandwidth over the bytes an ideal step reads at that length (the prompt and
    # half the decoded tokens cached); the fraction is measured over bound.
    entry = profile["programs"]["moe"]
    read = decode_read_bytes(micro_cfg(), 24 + 5 // 2, 32, kv_dtype_bytes=4)
    assert entry["decode_read_bytes"]["24"] == read
    assert entry["decode_read_bytes"]["6"]["kv_cache"] < read["kv_cache"]
    bound = profile["bandwidth"]["gb_s"] * 1e9 / read["total"]
    median = profile["summary"]["moe"]["24"]["decode_tok_s"]["median"]
    assert entry["decode_fraction_of_bound"]["24"] == pytest.approx(median / bound)
    # ExecuTorch's own runner timed the same program from text prompts: its Stats per run.
    for n in map(str, cfg.prompt_lengths):
        runs = profile["runner"][n]["runs"]
        assert len(runs) == cfg.repeats
        for run in runs:
            assert 1 <= run["num_generated_tokens"] <= cfg.decode_tokens and run["num_prompt_tokens"] >= 1
            assert run["ttft_ms"] >= 0
    assert "ExecuTorch's own LLM runner" in report
    assert 0 < entry["peak_rss_increment_mib"] < entry["peak_rss_mib"]
    # Expert load: top-2 x decode steps x measured runs, per layer.
    assert [sum(row) for row in profile["expert_load"]["counts"]] == [2 * cfg.decode_tokens * cfg.repeats] * 2
    assert profile["machine"]["threads"] == 1 and profile["machine"]["versions"]["executorch"]


@pytest.mark.slow  # one more lowering of the micro twin
def test_a_twin_built_in_a_child_process_is_the_bytes_the_profile_built_in_its_own(profiled, micro_program, tmp_path):
    """The stage builds its twins in child processes when it has the threads
    (pipeline/profile/twin_build.py); the fixture's one twin was built in its own process.
    (That each child builds its own spec: tests/profile/test_twin_build.py.)"""
    out, _, cfg = profiled
    moe = load_program(micro_program[0])
    spec = TwinSpec(
        dense_twin(micro_cfg(), "total", cfg.group_size),
        cfg.group_size,
        cfg.seed,
        moe.max_context,
        last_logits_only=True,
        bos_id=moe.metadata["bos_id"],
        eos_id=moe.metadata["eos_id"],
        kv_cache=cfg.kv_cache,
        path=tmp_path / "dense_total.pte",
    )
    seconds = build_twins([spec], workers=2)  # workers > 1: a child process, even for one twin
    assert list(seconds) == [spec.path] and seconds[spec.path] > 0
    for name in ("dense_total.pte", "dense_total.kernels.json"):
        assert (tmp_path / name).read_bytes() == (out / "programs" / name).read_bytes(), name


def test_program_inputs_name_a_missing_or_corrupt_file_and_a_prompt_too_long(micro_program, tmp_path):
    path = micro_program[0]
    missing = ProgramInput("stage.profile.program", tmp_path / "none.pte", 10, VOCAB)
    with pytest.raises(StageInputError, match=r"stage.profile.program: .*none.pte: no such ExecuTorch program"):
        missing.check()
    corrupt = tmp_path / "corrupt.pte"
    corrupt.write_bytes(path.read_bytes()[:200] + os.urandom(300))
    with pytest.raises(StageInputError, match=r"corrupt.kernels.json: missing; the list of kernel libraries"):
        ProgramInput("stage.profile.program", corrupt, 10, VOCAB).check()
    _kernels_beside(corrupt, path)
    with pytest.raises(StageInputError, match=r"corrupt.pte: not a loadable ExecuTorch program"):
        ProgramInput("stage.profile.program", corrupt, 10, VOCAB).check()
    too_long = MAX_CONTEXT + 1
    with pytest.raises(StageInputError, match=rf"lengths: the longest run needs {too_long} .*holds {MAX_CONTEXT}"):
        ProgramInput("stage.profile.program", path, too_long, VOCAB).check()
    with pytest.raises(StageInputError, match="vocab_size 512, the model config 4096"):
        ProgramInput("stage.profile.program", path, 10, 4096).check()
    wrong = tmp_path / "wrong_signature.pte"
    wrong.write_bytes(_program_with_metadata_but_another_forward())
    _kernels_beside(wrong, path)
    with pytest.raises(ProgramError, match=r"wrong_signature.pte: its methods do not run as forward\(tokens"):
        load_program(wrong)
    assert ProgramInput("stage.profile.program", path, MAX_CONTEXT, VOCAB).check() == path


def _kernels_beside(pte: Path, like: Path) -> None:
    """The kernel list of program ``like`` written beside ``pte`` (what the export writes)."""
    from pipeline.export.kernels import requirements_path

    requirements_path(pte).write_text(requirements_path(like).read_text())


def _program_with_metadata_but_another_forward() -> bytes:
    from executorch.exir import to_edge_transform_and_lower

    class Other(torch.nn.Module):
        def forward(self, x_23):
            return x_23 * 2

    exported = torch.export.export(Other(), (torch.ones(2, 3),))
    metadata = {"max_context": 8, "vocab_size": VOCAB, "bos_id": 1, "eos_id": 2}
    return to_edge_transform_and_lower(exported, constant_methods=metadata).to_executorch().buffer


def test_held_out_runs_must_not_overlap(micro_data):
    from pipeline.profile.artifacts import distinct_prompts

    windows = distinct_prompts(micro_data / "pretrain", 3, 40)
    assert len({tuple(w) for w in windows}) == 3
    with pytest.raises(ValueError, match=r"stage.profile.repeats: 400 runs .* need 16000 distinct"):
        distinct_prompts(micro_data / "pretrain", 400, 40)


def test_threads_above_the_cores_are_refused_naming_the_key():
    cores = usable_cores()
    with pytest.raises(StageInputError, match=rf"stage.profile.threads: {cores + 1} threads .* {cores} usable"):
        ThreadsInput("stage.profile.threads", cores + 1, on_cluster=False).check()
    assert ThreadsInput("stage.profile.threads", cores + 1, on_cluster=True).check() == cores + 1
    with pytest.raises(ThreadsError, match=rf"--threads: {cores + 1} threads"):
        set_threads(cores + 1, "--threads")


def test_lengths_beyond_the_export_context_fail_in_the_config():
    from pipeline.configbase import ConfigError

    with pytest.raises(ConfigError, match=r"stage.profile.prompt_lengths: a 240-token prompt .* needs 272 positions"):
        validate(compose(["stage.profile.prompt_lengths=[16,240]"]))
    with pytest.raises(ConfigError, match="stage.profile.baselines: unknown"):
        validate(compose(["stage.profile.baselines=[dense_half]"]))


def test_stage_refuses_a_corrupt_program_before_work_and_touches_nothing(tmp_path):
    from pipeline.runner.run import run_stage
    from pipeline.stages.profile import PROFILE

    corrupt = tmp_path / "model.pte"
    corrupt.write_bytes(b"PK\x03\x04 not an ExecuTorch program")
    nothing_needed = {"backends": [], "kernel_libraries": [], "portable_operators": []}
    corrupt.with_suffix(".kernels.json").write_text(json.dumps(nothing_needed))
    before = corrupt.read_bytes()
    out = tmp_path / "profile_out"
    raw = compose([f"stage.profile.program={corrupt}", f"stage.profile.out_dir={out}"])
    with pytest.raises(StageInputError, match=r"^stage.profile.program: .*not a loadable ExecuTorch program"):
        run_stage(PROFILE, raw, state_dir=tmp_path / "state")
    assert corrupt.read_bytes() == before and not out.exists()


def test_runner_rates_follow_executorchs_definitions_from_its_stats():
    from types import SimpleNamespace

    from pipeline.profile.runner_stats import _rates

    stats = SimpleNamespace(
        inference_start_ms=1000, prompt_eval_end_ms=1040, first_token_ms=1041, inference_end_ms=1140,
        num_prompt_tokens=80, num_generated_tokens=25, to_json_string=lambda: '{"generated_tokens": 25}',
    )  # fmt: skip
    rates = _rates(stats)
    assert rates["prefill_tok_s"] == pytest.approx(80 / 0.040)  # prompt / (prompt_eval_end - inference_start)
    assert rates["decode_tok_s"] == pytest.approx(25 / 0.100)  # generated / (inference_end - prompt_eval_end)
    assert rates["ttft_ms"] == 41 and rates["stats"] == {"generated_tokens": 25}
    frozen = SimpleNamespace(**{**vars(stats), "prompt_eval_end_ms": 1000, "inference_end_ms": 1000})
    assert _rates(frozen)["prefill_tok_s"] is None and _rates(frozen)["decode_tok_s"] is None

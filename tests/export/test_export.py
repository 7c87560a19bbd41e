"""Export: the sparse INT4 .pte, the .pt2 and the HF directory compute what the eager model
computes; bad inputs are named before any lowering; the XNNPACK shim is still needed.

One micro MoE (2 layers x 4 experts, top-2, shared expert) is quantized and lowered
once per session (tests/conftest.py: ``converted``, ``lowered``) and shared by the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from shapes import MAX_CONTEXT, VOCAB, micro_cfg, trained_like

from pipeline.data.tokenizer import BOS, EOS, PAD, Tokenizer
from pipeline.export.checks import Gate, compare, cosine, exact_compare, sqnr_db, top1_margin
from pipeline.export.hf import HFMappingError, dequantized, hf_config, load_hf, save_hf
from pipeline.export.lower import (
    EMBEDDING_KERNEL_OP,
    HEAD_KERNEL_OP,
    INT4_GEMM_OP,
    MOE_KERNEL_OP,
    expected_int4_gemms,
    expected_project_kernels,
    expert_weight_table,
    operator_table,
)
from pipeline.export.noise import noise_floor
from pipeline.export.program import ExportableLM, ExportInputError
from pipeline.export.runner import (
    ContextOverflowError,
    EagerRunner,
    HFRunner,
    ProgramRunner,
    Pt2Runner,
    PteRunner,
    greedy,
)
from pipeline.model import ModelConfig, Transformer
from pipeline.quant.config import QuantConfig
from pipeline.quant.convert import post_training_quantize
from pipeline.quant.fake import prepare

Q = QuantConfig(group_size=32)


@pytest.fixture(scope="module")
def tokenizer(micro_data) -> Tokenizer:
    return Tokenizer.load(micro_data / "tokenizer" / "tokenizer.json")


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    texts = ["What is 12 plus 30? The answer is", "A fortune: you will", "Q: 7 times 6\nA:"]
    return [tokenizer.encode(t) for t in texts]


def test_pte_matches_the_eager_converted_model_and_generates_text(converted, lowered, prompts, tokenizer):
    pte = PteRunner(lowered["dir"] / "model.pte")
    assert pte.metadata == lowered["meta"]
    eager = EagerRunner(converted, MAX_CONTEXT)
    result = compare(noise_floor(converted, prompts, 8, 0.05), eager, pte, prompts, Gate())
    assert result["passed"], result
    # Prefill rows and decode rows (the program's own cache) are both checked.
    assert result["positions"] == sum(len(p) + len(p) - len(p) // 2 for p in prompts)
    new = greedy(pte, prompts[0], 12)
    assert len(new) == 12 and all(0 <= t < VOCAB for t in new)
    assert isinstance(tokenizer.decode(new), str)


def test_pt2_matches_the_eager_converted_model(converted, lowered, prompts):
    floor = noise_floor(converted, prompts, 8, 0.05)
    pt2 = Pt2Runner(lowered["dir"] / "model.pt2", MAX_CONTEXT)
    result = compare(floor, EagerRunner(converted, MAX_CONTEXT), pt2, prompts, Gate())
    assert result["passed"], result


def test_every_gemm_is_int4_and_the_routed_experts_are_one_kernel_per_layer(lowered, converted):
    ops = lowered["operators"]
    assert ops["portable_compute"] == [], ops["portable"]
    # Per layer: the shared expert's 2 GEMMs, attention's 2. The routed experts (4 x 2
    # GEMMs per layer in the xnnpack form) run in one fused kernel per layer, and the
    # tied head in the project's table kernel (in the xnnpack form, one more GEMM).
    int4_gemms = 2 * (2 + 2)
    assert expected_int4_gemms(micro_cfg()) == int4_gemms
    assert expected_int4_gemms(micro_cfg(), "xnnpack") == 2 * (4 * 2 + 2 + 2) + 1
    assert expected_int4_gemms(micro_cfg(moe=None, ffn_dim=96, n_layers=3)) == 3 * (2 + 2)
    assert expected_int4_gemms(micro_cfg(tie_embeddings=False)) == int4_gemms + 1
    fused = {MOE_KERNEL_OP: 2, EMBEDDING_KERNEL_OP: 1, HEAD_KERNEL_OP: 1}
    assert expected_project_kernels(micro_cfg()) == fused
    assert expected_project_kernels(micro_cfg(tie_embeddings=False)) == {
        **fused,
        EMBEDDING_KERNEL_OP: 0,
        HEAD_KERNEL_OP: 0,
    }
    assert set(expected_project_kernels(micro_cfg(), "xnnpack").values()) == {0}
    assert ops["delegated"][INT4_GEMM_OP] == int4_gemms
    assert ops["delegated"]["quantized_decomposed.dequantize_per_token.default"] == int4_gemms
    assert ops["delegated"]["aten.linear.default"] == int4_gemms + 2  # + the FP32 routers
    assert {op: ops["portable"][op] for op in fused} == fused
    # Nothing per expert is left in the graph: no split into per-expert blocks.
    assert "aten.split_with_sizes_copy.default" not in ops["portable"]
    (row, _) = expert_weight_table(lowered["program"])
    # One expert: w1|w3 (64 x 64) and w2 (64 x 32), INT4 packed, FP32 scale per 32.
    by_hand = (64 * 64 + 64 * 32) // 2 + (64 * 64 // 32 + 64 * 32 // 32) * 4
    assert row["bytes_per_expert"] == by_hand and row["all_experts_equal"]
    assert row["bytes_read_per_token"] < row["bytes_all_experts"]
    xnnpack_row = expert_weight_table(ExportableLM(converted, MAX_CONTEXT, moe="xnnpack"))[0]
    assert xnnpack_row == row


def test_the_fused_and_per_expert_forms_compute_the_same_moe(converted):
    fused, per_expert = (ExportableLM(converted, MAX_CONTEXT, moe=form).layers[0].ffn for form in ("fused", "xnnpack"))
    x_TD = torch.randn(9, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = fused(x_TD), per_expert(x_TD)
    # The same 8da4w maths in other operators: equal to float rounding.
    assert torch.allclose(a, b, atol=1e-5 * float(b.abs().max())), float((a - b).abs().max())
    with pytest.raises(ExportInputError, match="moe='dense'"):
        ExportableLM(converted, MAX_CONTEXT, moe="dense")


def test_counting_sort_groups_slots_by_expert_keeping_their_order():
    from pipeline.export.program import sort_by_expert

    experts_N = torch.tensor([2, 0, 2, 3, 0, 2])
    order_N, counts_E = sort_by_expert(experts_N, 5)
    assert order_N.tolist() == [1, 4, 0, 2, 5, 3]  # expert 0: slots 1, 4; expert 2: 0, 2, 5; 3: 3
    assert counts_E.tolist() == [2, 0, 3, 1, 0]
    random_N = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(1))
    order_N, _ = sort_by_expert(random_N, 7)
    assert torch.equal(order_N, torch.argsort(random_N, stable=True))


def test_sparse_moe_runs_experts_on_their_routed_tokens_only(converted):
    program = ExportableLM(converted, MAX_CONTEXT, moe="xnnpack")
    moe = program.layers[0].ffn
    calls: list[int] = []
    for expert in moe.routed.experts:
        expert.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    x_TD = torch.randn(5, 64)
    with torch.no_grad():
        moe(x_TD)
    _, experts_TK = moe.route(x_TD)
    assert calls == [int((experts_TK == e).any(-1).sum()) for e in range(4)]
    assert sum(calls) == 5 * 2  # every token's top-2, nothing else


def test_prompt_longer_than_the_context_is_refused_before_running(lowered):
    pte = PteRunner(lowered["dir"] / "model.pte")
    with pytest.raises(ContextOverflowError, match="max context is 64"):
        pte.logits(list(range(MAX_CONTEXT + 1)), 0)
    with pytest.raises(ContextOverflowError):
        pte.logits([1], MAX_CONTEXT)
    with pytest.raises(ContextOverflowError):
        greedy(pte, list(range(60)), 16)


BARE_RUNTIME = """
import sys, torch
from executorch.runtime import Runtime
from pipeline.export.kernels import MissingKernelsError, check_runtime, load_kernels, read_requirements
pte = sys.argv[1]
try:
    check_runtime(read_requirements(pte), pte)
except MissingKernelsError as err:
    print("REFUSED", err)
load_kernels(pte)
out = Runtime.get().load_program(pte).load_method("forward").execute([torch.tensor([[5, 6, 7]]), torch.tensor([0])])
print("RAN", tuple(out[0].shape))
"""


def test_the_program_lists_its_kernel_libraries_and_a_bare_runtime_is_refused_naming_them(lowered, tmp_path):
    pte = lowered["dir"] / "model.pte"
    kernels = json.loads(pte.with_suffix(".kernels.json").read_text())
    libraries = {lib["namespace"]: lib for lib in kernels["kernel_libraries"]}
    # The tied table's lookup is the project's kernel: ExecuTorch's quantized kernels are
    # needed only by the INT8 KV cache or the xnnpack form.
    assert set(libraries) == {"llama", "mobilemoe"}
    assert libraries["mobilemoe"]["operators"] == [
        "mobilemoe::embedding_int4.out",
        "mobilemoe::linear_int4.out",
        "mobilemoe::moe_experts_int4.out",
    ]
    assert {"llama::custom_sdpa.out", "llama::update_cache.out"} == set(libraries["llama"]["operators"])
    assert kernels["backends"] == ["XnnpackBackend"]
    assert "aten::topk.values" in kernels["portable_operators"]
    # A fresh process: ExecuTorch's runtime with none of the libraries loaded.
    run = subprocess.run([sys.executable, "-c", BARE_RUNTIME, str(pte)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    refused = next(line for line in run.stdout.splitlines() if line.startswith("REFUSED"))
    for lib in libraries.values():
        assert lib["name"] in refused and lib["cmake_target"] in refused and lib["python_import"] in refused
    assert "llama::custom_sdpa.out" in refused and "linear_int4" in refused and "moe_experts_int4" in refused
    assert f"RAN (1, 1, {VOCAB})" in run.stdout  # the last position's logits
    # A program without its list is refused, naming the file that is missing.
    alone = tmp_path / "alone.pte"
    alone.write_bytes(pte.read_bytes())
    with pytest.raises(RuntimeError, match=r"alone\.kernels\.json: missing"):
        PteRunner(alone)
    # A list that is not one, or that names a library this project does not know (the
    # loader imports only its own modules, never a name from the file), is refused.
    listed = alone.with_suffix(".kernels.json")
    listed.write_text("{not json")
    with pytest.raises(RuntimeError, match=r"alone\.kernels\.json: not a kernel list"):
        PteRunner(alone)
    foreign = {**kernels, "kernel_libraries": [{**libraries["llama"], "namespace": "os", "python_import": "os"}]}
    listed.write_text(json.dumps(foreign))
    with pytest.raises(RuntimeError, match=r"unknown namespace\(s\) \['os'\]"):
        PteRunner(alone)


def test_unconverted_models_and_small_groups_are_refused_naming_the_weight():
    with torch.no_grad():
        small_groups = post_training_quantize(trained_like(micro_cfg()), QuantConfig(group_size=16))
    with pytest.raises(ExportInputError, match="embed.weight: INT4 group of 16 .* multiple of 32"):
        ExportableLM(small_groups, MAX_CONTEXT)
    fp = trained_like(micro_cfg())
    with pytest.raises(ExportInputError, match="converted model"):
        ExportableLM(fp, MAX_CONTEXT)
    with pytest.raises(ExportInputError, match="converted model"):
        ExportableLM(prepare(trained_like(micro_cfg()), Q), MAX_CONTEXT)


def test_sqnr_and_cosine_by_hand():
    ref = torch.tensor([[3.0, 4.0]])
    noisy = torch.tensor([[3.0, 4.5]])
    # signal 25, noise 0.25: 10 log10(100) = 20 dB
    assert float(sqnr_db(ref, noisy)) == pytest.approx(20.0)
    assert float(cosine(ref, noisy)) == pytest.approx((9 + 18) / (5 * (9 + 20.25) ** 0.5))


@pytest.fixture(scope="module")
def hf_dir(converted, micro_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "hf"
    special = {"bos": BOS, "eos": EOS, "pad": PAD}
    save_hf(dequantized(converted), out, micro_data / "tokenizer" / "tokenizer.json", special, {"scheme": "8da4w"})
    return out


def test_hf_directory_equals_the_fp32_weights_and_the_reader_reads_it_back(converted, hf_dir, prompts):
    from transformers import AutoModelForCausalLM

    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["Glm4MoeForCausalLM"]
    assert config["rope_parameters"]["partial_rotary_factor"] == 1.0 and config["first_k_dense_replace"] == 0
    assert config["n_shared_experts"] == 2 and config["routed_scaling_factor"] == 2.5
    assert config["mobilemoe_quantization"] == {"scheme": "8da4w"}
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    fp = dequantized(converted)
    exact = exact_compare(EagerRunner(fp, MAX_CONTEXT), HFRunner(hf, MAX_CONTEXT), prompts, 1e-4)
    assert exact["passed"] and exact["max_abs_logit_diff"] < 1e-4, exact
    # FP32 activations against the INT8-activation model: apart by activation rounding only
    # (a wrong dequantization scale would pass the check above, whose reference shares it).
    # Rounding every element (not 5% by one step) is about 2 dB more noise: within the gate
    # (the export stage's hf_vs_int8 check).
    floor = noise_floor(converted, prompts, 8, 0.05)
    against_int4 = compare(floor, EagerRunner(converted, MAX_CONTEXT), HFRunner(hf, MAX_CONTEXT), prompts, Gate())
    assert against_int4["passed"], against_int4
    back = load_hf(hf_dir)
    for (name, a), b in zip(fp.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_plain_transformers_loads_the_directory_and_generates_the_same_text(converted, hf_dir, prompts, tokenizer):
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}, dtype=torch.float32)\n"
        f"t = AutoTokenizer.from_pretrained({str(hf_dir)!r})\n"
        "ids = t(sys.argv[1], return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=16, do_sample=False)\n"
        "print(out[0].tolist())\n"
        "assert 'pipeline' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    text = "What is 12 plus 30? The answer is"
    proc = subprocess.run(
        [sys.executable, "-c", script, text], capture_output=True, text=True, cwd=hf_dir, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    prompt = tokenizer.encode(text)
    assert theirs[: len(prompt)] == prompt and len(theirs) == len(prompt) + 16
    # Their continuation, teacher-forced through ours (the same FP32 weights): every token
    # theirs chose is our argmax, except at a tie within FP32 summation noise (1e-4).
    rows = EagerRunner(dequantized(converted), MAX_CONTEXT).logits(theirs[:-1], 0)[len(prompt) - 1 :]
    chosen = torch.tensor(theirs[len(prompt) :])
    tied = top1_margin(rows) < 2e-4
    assert bool(((rows.argmax(-1) == chosen) | tied).all()), (theirs, rows.topk(2, dim=-1))


def test_dense_twin_maps_onto_qwen3_with_sliding_window_layers(tmp_path, micro_data, prompts):
    from transformers import AutoModelForCausalLM

    cfg = micro_cfg(moe=None, ffn_dim=96, sliding_window=4, global_every=2)
    model = trained_like(cfg)
    special = {"bos": BOS, "eos": EOS, "pad": PAD}
    save_hf(model, tmp_path / "hf", micro_data / "tokenizer" / "tokenizer.json", special, {"scheme": "none"})
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    # Prompts longer than the window, so the window matters.
    result = exact_compare(EagerRunner(model, MAX_CONTEXT), HFRunner(hf, MAX_CONTEXT), prompts, 1e-4)
    assert result["passed"], result


@pytest.mark.parametrize(
    ("overrides", "knob"),
    [
        ({"score_func": "softmax"}, "model.moe.score_func"),
        ({"shared_ffn_dim": 48}, "model.moe.shared_ffn_dim"),
        ({"num_shared_experts": 0, "shared_ffn_dim": 0}, "model.moe.num_shared_experts"),
    ],
)
def test_architecture_hf_cannot_express_names_the_knob(overrides, knob):
    moe = replace(micro_cfg().moe, **overrides)
    with pytest.raises(HFMappingError, match=knob):
        hf_config(micro_cfg(moe=moe), 0, 1, 2)


def test_moe_with_sliding_window_and_dense_without_qk_norm_are_named():
    with pytest.raises(HFMappingError, match="model.sliding_window"):
        hf_config(micro_cfg(sliding_window=8, global_every=2), 0, 1, 2)
    with pytest.raises(HFMappingError, match="model.qk_norm"):
        hf_config(micro_cfg(moe=None, ffn_dim=96, qk_norm=False), 0, 1, 2)


def test_shim_is_still_needed():
    """Upstream XNNPACK refuses a GEMM whose row count is data dependent; when an
    upgrade accepts it, this fails: remove pipeline/export/xnnpack_shim.py then."""
    from executorch.backends.xnnpack.partition.config.xnnpack_config import XNNPartitionerConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    from pipeline.export.program import Int4Linear
    from pipeline.export.xnnpack_shim import OVERRIDDEN, sparse_partitioner
    from pipeline.quant.convert import QuantizedWeight

    assert hasattr(XNNPartitionerConfig, OVERRIDDEN)

    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = Int4Linear(QuantizedWeight.quantize(torch.randn(32, 64), 4, 32))

        def forward(self, x_TD, keep_T):
            token_n = torch.arange(x_TD.shape[0]).masked_select(keep_T)
            torch._check(token_n.shape[0] <= x_TD.shape[0])
            return self.linear(x_TD.index_select(0, token_n))

    args = (torch.randn(6, 64), torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool))
    dims = ({0: torch.export.Dim("T", min=1, max=32)}, {0: torch.export.Dim("T", min=1, max=32)})
    compile_config = EdgeCompileConfig(_core_aten_ops_exception_list=[torch.ops.aten.masked_select.default])

    def delegated_gemms(partitioner) -> int:
        exported = torch.export.export(Routed(), args, dynamic_shapes=dims, strict=False)
        edge = to_edge_transform_and_lower(exported, partitioner=[partitioner], compile_config=compile_config)
        return operator_table(edge.exported_program())["delegated"].get("aten.linear.default", 0)

    assert delegated_gemms(XnnpackPartitioner()) == 0
    assert delegated_gemms(sparse_partitioner()) == 1


def test_stage_inputs_name_a_missing_or_unconverted_model_and_an_unmappable_architecture(tmp_path, converted):
    from pipeline.quant.format import save_quantized
    from pipeline.runner.errors import StageInputError
    from pipeline.runner.inputs import HFMappableInput, QuantizedModelInput
    from pipeline.train.checkpoint import save_checkpoint

    cfg = micro_cfg()
    key = "stage.export.quantized"
    with pytest.raises(StageInputError, match=r"stage.export.quantized: .* does not exist \(has the qat stage run\?\)"):
        QuantizedModelInput(key, tmp_path / "quantized" / "model.safetensors", cfg).check()
    # A full-precision training checkpoint (what outputs/qat/model holds) is refused.
    ckpt = save_checkpoint(tmp_path / "model", 6, trained_like(cfg).state_dict(), None, {"model": {}})
    for path in (ckpt, ckpt / "model.safetensors"):
        with pytest.raises(StageInputError, match="not a converted|training checkpoint"):
            QuantizedModelInput(key, path, cfg).check()
    good = tmp_path / "q" / "model.safetensors"
    save_quantized(converted, Q, good)
    assert QuantizedModelInput(key, good, cfg).check() == good
    with pytest.raises(StageInputError, match="model config differs .* model.d_model"):
        QuantizedModelInput(key, good, micro_cfg(d_model=128)).check()
    # A QAT study's 2-bit model is named before the lowering starts (its program would
    # refuse the weights only after loading them).
    study, study_q = tmp_path / "study" / "model.safetensors", replace(Q, scheme="8da2w")
    with torch.no_grad():
        save_quantized(post_training_quantize(trained_like(cfg), study_q), study_q, study)
    with pytest.raises(StageInputError, match=r"is 8da2w, a QAT study scheme; .* stage\.qat\.scheme=8da4w"):
        QuantizedModelInput(key, study, cfg).check()
    assert HFMappableInput("model", cfg).check() == "Glm4MoeForCausalLM"
    softmax = micro_cfg(moe=replace(cfg.moe, score_func="softmax"))
    with pytest.raises(StageInputError, match="model: .*model.moe.score_func"):
        HFMappableInput("model", softmax).check()


def _eager_pair(cfg: ModelConfig, q: QuantConfig = Q) -> tuple[Transformer, ExportableLM]:
    with torch.no_grad():
        model = post_training_quantize(trained_like(cfg), q)
    return model, ExportableLM(model, MAX_CONTEXT)


@pytest.mark.parametrize(
    ("name", "cfg", "q"),
    [
        ("untied head", micro_cfg(tie_embeddings=False), Q),
        (
            "softmax router, no route norm, no shared",
            micro_cfg(
                moe=replace(
                    micro_cfg().moe, score_func="softmax", route_norm=False, num_shared_experts=0, shared_ffn_dim=0
                )
            ),
            Q,
        ),
        (
            "dense, sliding window, Hkv == H",
            micro_cfg(moe=None, ffn_dim=96, n_kv_heads=4, sliding_window=5, global_every=2),
            Q,
        ),
        ("one KV head, no QK-norm", micro_cfg(n_kv_heads=1, qk_norm=False), Q),
        ("per-channel weights", micro_cfg(), QuantConfig(granularity="per_channel")),
    ],
)
def test_exportable_program_equals_the_converted_model_in_eager_mode(name, cfg, q):
    """Without lowering (milliseconds): prefill in chunks of 8 tokens (each at
    its position) and decode, every position, through the export gate: the two sides
    quantize activations with other ops (torchao's, quantized_decomposed's), so they may
    differ by rounding only."""
    model, program = _eager_pair(cfg, q)

    class Chunked(ProgramRunner):
        def _run(self, tokens_1S, start):
            parts = torch.split(tokens_1S, 8, dim=1) if tokens_1S.shape[1] > 8 else [tokens_1S]
            rows, at = [], start
            for part in parts:
                rows.append(super()._run(part, at))
                at += part.shape[1]
            return torch.cat(rows)

    prompts = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3)).tolist()
    floor = noise_floor(model, prompts, draws=8, fraction=0.05)
    result = compare(floor, EagerRunner(model, MAX_CONTEXT), Chunked(program, MAX_CONTEXT), prompts, Gate())
    assert result["passed"], (name, result)
    # Both sides are PyTorch ops on this CPU: far below the rounding noise, not just within.
    assert max(result["prefill_excess_noise_db"], result["decode_excess_noise_db"]) < -20, (name, result)


def test_sparse_moe_output_equals_the_converted_moe(converted):
    program = ExportableLM(converted, MAX_CONTEXT)
    x_TD = torch.randn(7, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_TD = converted.layers[1].ffn(x_TD[None])[0][0]
        got_TD = program.layers[1].ffn(x_TD)
    assert float(sqnr_db(ref_TD, got_TD).min()) > 30


def test_executorchs_own_llm_runner_runs_the_program_and_generates_what_eager_does(
    converted, lowered, micro_data, prompts, tokenizer
):
    """TextLLMRunner (the runner a phone app links) reads the program's metadata, the
    recipe's tokenizer.json, and decodes through the program's cache; its text parts from
    the eager INT4 model's nowhere but at a near-tie."""
    from pipeline.export.llm_runner import llm_runner_parity, runner_text

    tok_json = micro_data / "tokenizer" / "tokenizer.json"
    args = (lowered["dir"] / "model.pte", tok_json, tokenizer)
    result = llm_runner_parity(*args, converted, prompts, 12, MAX_CONTEXT, 0.05, 8, 2.0)
    assert result["passed"] and result["prompts"] == len(prompts), result
    assert result["agreed"] + result["parted_at_near_tie"] == len(prompts), result
    text = tokenizer.decode(prompts[0])
    assert runner_text(lowered["dir"] / "model.pte", tok_json, text, 12) != ""
    # The check can fail: against another model's greedy text, the runner parts far from any tie.
    with torch.no_grad():
        other = post_training_quantize(trained_like(micro_cfg(), seed=3), Q)
    wrong = llm_runner_parity(*args, other, prompts, 12, MAX_CONTEXT, 0.05, 8, 2.0)
    assert not wrong["passed"] and wrong["parted_beyond_noise"] > 0, wrong

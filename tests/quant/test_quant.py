"""QAT/PTQ maths: fake quantization reaches every matrix, convert is real and exact,
the file format matches the accounting, and coverage fails on a skipped expert."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from shapes import small_moe, tiny_config
from torch import nn
from torchao.quantization import quantize_
from torchao.quantization.qat import QATConfig

from pipeline.configbase import ConfigError
from pipeline.model import Transformer
from pipeline.model.accounting import int4_weight_bytes
from pipeline.model.moe import GroupedExperts
from pipeline.quant import QuantConfig, quantized_input_dims
from pipeline.quant.convert import QuantizedWeight, convert, post_training_quantize
from pipeline.quant.coverage import CoverageError, coverage, require_coverage
from pipeline.quant.fake import FakeQuantExperts, linear_config, prepare
from pipeline.quant.format import load_quantized, pack_int4, save_quantized, unpack_int4, weight_bytes


def _model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = tiny_config(d_model=64, head_dim=16, moe=small_moe(expert_ffn_dim=32, shared_ffn_dim=64), **overrides)
    return Transformer(cfg)


def _tokens(model: Transformer, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (2, 24), generator=g)


@pytest.mark.parametrize(
    ("scheme", "granularity"), [("8da4w", "per_group"), ("8da4w", "per_channel"), ("8da2w", "per_group")]
)
def test_fake_quant_experts_equal_torchao_quantized_linears_per_expert(scheme, granularity):
    q = QuantConfig(scheme=scheme, group_size=16, granularity=granularity)
    torch.manual_seed(0)
    E, F_, D = 4, 32, 64
    experts = GroupedExperts(D, small_moe(num_experts=E, top_k=2, expert_ffn_dim=F_))
    fake = FakeQuantExperts(experts, q)
    counts_E = torch.tensor([5, 0, 9, 2])  # expert 1 gets no tokens: skipped, not an error
    x_ND = torch.randn(int(counts_E.sum()), D) * 3
    got_ND = fake(x_ND, counts_E)

    expected, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        lin = {}
        for name, w in (("w1", experts.w1_EFD[e]), ("w3", experts.w3_EFD[e]), ("w2", experts.w2_EDF[e])):
            layer = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False))
            layer[0].weight.data.copy_(w.detach())
            quantize_(layer, QATConfig(linear_config(q), step="prepare"))
            quantize_(layer, QATConfig(linear_config(q), step="convert"))  # the real INT4 linear
            lin[name] = layer
        x_nD = x_ND[start : start + n]
        start += n
        if n:
            expected.append(lin["w2"](F.silu(lin["w1"](x_nD)) * lin["w3"](x_nD)))
    expected_ND = torch.cat(expected)
    # Same quantized weights and activations; only the float summation order of the
    # grouped GEMM differs from F.linear's.
    torch.testing.assert_close(got_ND, expected_ND, rtol=1e-5, atol=1e-5)
    # and the fake quantization did something: the full-precision experts differ
    plain_ND = experts(x_ND, counts_E)
    assert (plain_ND - got_ND).abs().max() > 1e-3


def test_int4_weight_quantization_by_hand():
    # symmetric INT4: scale = max|w| / 7.5 (torchao maps [-max, max] onto [-8, 7]),
    # values = round-half-even(w / scale) clamped to [-8, 7]
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5, 0.1, 0.2, -0.4, 0.3]])
    qw = QuantizedWeight.quantize(w, bits=4, group=4)
    torch.testing.assert_close(qw.scale, torch.tensor([[0.4, 0.4 / 7.5]]))
    assert qw.values.tolist() == [[2, -5, 7, 1, 2, 4, -8, 6]]
    torch.testing.assert_close(
        qw.dequantize(), torch.tensor([[0.8, -2.0, 2.8, 0.4, 0.4 / 7.5 * 2, 0.4 / 7.5 * 4, -0.4 / 7.5 * 8, 0.32]])
    )
    assert qw.nbytes() == 8 // 2 + 2 * 4


def test_int2_weight_quantization_by_hand():
    # symmetric INT2: scale = max|w| / 1.5 (torchao maps [-max, max] onto [-2, 1]),
    # values = round-half-even(w / scale) clamped to [-2, 1]; stored a nibble each
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5, 0.3, -0.6, 0.15, 0.0]])
    qw = QuantizedWeight.quantize(w, bits=2, group=4)
    torch.testing.assert_close(qw.scale, torch.tensor([[2.0, 0.4]]))
    # 0.5 -> 0 (half to even), 1.5 -> 2 -> clamped to 1; 0.75 -> 1, -1.5 -> -2, 0.375 -> 0
    assert qw.values.tolist() == [[0, -1, 1, 0, 1, -2, 0, 0]]
    assert qw.nbytes() == 8 // 2 + 2 * 4


def test_a_study_scheme_sets_the_weight_bits_of_every_matrix_and_the_int4_embedding():
    model = prepare(_model(), QuantConfig(scheme="8da3w", group_size=16))
    rows = {r.name: r for r in coverage(model)}
    require_coverage(list(rows.values()))
    assert rows["layers.1.ffn.experts.w2_EDF"].scheme == "int3/g16 + int8 act (fake)"
    assert rows["layers.0.attn.wq.weight"].scheme == "int3/g16 + int8 act (fake)"
    assert rows["embed.weight"].scheme == "int3/g16 + int8 act (fake)"
    with torch.no_grad():
        converted = convert(model, QuantConfig(scheme="8da3w", group_size=16))
    got = {r.name: r.scheme for r in coverage(converted)}
    assert got["layers.1.ffn.experts.w2_EDF"] == got["layers.0.attn.wq.weight"] == "int3/g16 + int8 act (converted)"
    values = converted.layers[1].ffn.experts.qweights["w2_EDF"].values
    assert values.min() >= -4 and values.max() <= 3 and values.min() == -4  # the INT3 range, used
    int8_embedding = prepare(_model(), QuantConfig(scheme="8da2w", group_size=16, embedding="int8"))
    assert {r.name: r.scheme for r in coverage(int8_embedding)}["embed.weight"].startswith("int8/g64")


def test_a_stored_value_outside_its_bit_width_is_named_on_load(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pipeline.quant.format import QuantizedFormatError

    q = QuantConfig(scheme="8da2w", group_size=16)
    path = tmp_path / "m.safetensors"
    save_quantized(post_training_quantize(_model(), q), q, path)
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = "layers.0.ffn.experts.w2_EDF"
    values = unpack_int4(tensors[f"{name}.values"])
    assert values.min() >= -2 and values.max() <= 1  # as written: the INT2 range
    values.view(-1)[5] = 7  # fits a nibble, not two bits
    tensors[f"{name}.values"] = pack_int4(values)
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(QuantizedFormatError, match=rf"{name} holds values in \[-2, 7\], outside the 2-bit range"):
        load_quantized(path)


def test_pack_int4_round_trip_and_layout():
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert packed[0, 0].item() == (0x8 | (0x9 << 4))  # -8 -> 0x8 low nibble, -7 -> 0x9 high
    assert torch.equal(unpack_int4(packed), values)


def test_prepare_reaches_every_matrix_and_coverage_fails_on_a_skipped_expert():
    model = prepare(_model(), QuantConfig(group_size=16))
    rows = {r.name: r for r in coverage(model)}
    require_coverage(list(rows.values()))
    quantized = {name for name, r in rows.items() if r.scheme.startswith("int4")}
    assert quantized == {name for name, _ in quantized_input_dims(model.cfg)}
    for name, r in rows.items():
        if name not in quantized:
            assert r.scheme in ("fp32 router", "fp32 norm"), (name, r.scheme)
    assert rows["layers.1.ffn.experts.w2_EDF"].scheme == "int4/g16 + int8 act (fake)"
    assert rows["layers.0.ffn.router.weight_ED"].scheme == "fp32 router"

    # a quantizer that skips one layer's experts (the field's most common failure)
    plain = GroupedExperts(model.cfg.d_model, model.cfg.moe)
    model.layers[1].ffn.experts = plain
    with pytest.raises(CoverageError, match=r"layers\.1\.ffn\.experts\.w1_EFD.*w2_EDF.*w3_EFD"):
        require_coverage(coverage(model))


@pytest.mark.parametrize("scheme", ["8da4w", "8da3w", "8da2w"])
def test_converted_model_equals_fake_quant_and_round_trips_through_the_file(tmp_path, scheme):
    q = QuantConfig(scheme=scheme, group_size=16)
    fake = prepare(_model(), q).eval()
    tokens = _tokens(fake)
    with torch.no_grad():
        fake_logits = fake(tokens)
        converted = convert(copy.deepcopy(fake), q)
        conv_logits = converted(tokens)
    # The same INT weights and INT8 activations; only float summation order differs.
    torch.testing.assert_close(conv_logits, fake_logits, rtol=0, atol=1e-4)
    rows = coverage(converted)
    require_coverage(rows)
    assert all(r.scheme.endswith("(converted)") for r in rows if not r.full_precision)

    path = tmp_path / "model.safetensors"
    save_quantized(converted, q, path)
    loaded, q2 = load_quantized(path)
    assert q2 == q
    with torch.no_grad():
        assert torch.equal(loaded(tokens), conv_logits)
    # no pickle anywhere: the file is safetensors (8-byte header length + JSON)
    assert path.read_bytes()[8:9] == b"{"


@pytest.mark.parametrize(
    ("scheme", "group", "embedding", "bits"),
    [("8da4w", 16, "int4", 4), ("8da4w", 32, "int4", 4), ("8da4w", 16, "int8", 8), ("8da2w", 16, "int8", 8)],
)
def test_measured_weight_bytes_equal_the_accounting(tmp_path, scheme, group, embedding, bits):
    # A study scheme's 2-bit values are stored a nibble each: the INT4 accounting's bytes.
    q = QuantConfig(scheme=scheme, group_size=group, embedding=embedding)
    model = post_training_quantize(_model(), q)
    path = tmp_path / "m.safetensors"
    save_quantized(model, q, path)
    expected = int4_weight_bytes(model.cfg, group, scale_bytes=4, norm_bytes=4, embedding_bits=bits)
    assert weight_bytes(path) == expected
    assert sum(r.bytes for r in coverage(model)) == expected


def test_untied_head_is_a_quantized_linear():
    model = prepare(_model(tie_embeddings=False), QuantConfig(group_size=16))
    rows = {r.name: r for r in coverage(model)}
    assert rows["head.weight"].scheme == "int4/g16 + int8 act (fake)"
    assert rows["embed.weight"].scheme == "int4/g16 (fake)"
    require_coverage(list(rows.values()))


def test_group_size_that_does_not_divide_a_weight_names_it():
    cfg = tiny_config(d_model=64, head_dim=16, moe=small_moe(expert_ffn_dim=40, shared_ffn_dim=64))
    with pytest.raises(
        ConfigError, match=r"^group_size: 16 does not divide the input dim 40 of layers\.0\.ffn\.experts\.w2_EDF"
    ):
        QuantConfig(group_size=16).check_fits(cfg)
    QuantConfig(group_size=8).check_fits(cfg)
    QuantConfig(group_size=16, granularity="per_channel").check_fits(cfg)


def test_unknown_scheme_is_named():
    with pytest.raises(ConfigError, match=r"^scheme: unknown scheme 'w4a4' \(known: 8da4w, 8da3w, 8da2w\)"):
        QuantConfig(scheme="w4a4")
    assert [QuantConfig(scheme=s).weight_bits for s in ("8da4w", "8da3w", "8da2w")] == [4, 3, 2]


def test_recovered_fraction_by_hand():
    from pipeline.train.compare import recovered_fraction

    assert recovered_fraction(loss_ptq=3.0, loss_qat=2.6, loss_reference=2.2) == pytest.approx(0.5)
    assert recovered_fraction(loss_ptq=3.0, loss_qat=3.4, loss_reference=2.2) == pytest.approx(-0.5)
    assert recovered_fraction(loss_ptq=2.0, loss_qat=1.0, loss_reference=2.0) is None  # no gap to recover


def test_converted_model_prints_and_keeps_its_int_weights_as_buffers():
    q = QuantConfig(group_size=16)
    model = post_training_quantize(_model(), q)
    assert "QuantizedExperts" in repr(model) and "FakeQuantExperts" not in repr(model)
    buffers = dict(model.named_buffers())
    assert buffers["layers.0.ffn.experts.w1_EFD_values"].dtype == torch.int8
    assert "embed.weight_scale" in buffers
    assert not any(k.endswith(("_values", "_scale")) for k in model.state_dict())  # the format saves them


def test_int8_embedding_needs_no_groups():
    cfg = tiny_config(
        d_model=48, head_dim=16, n_heads=3, n_kv_heads=1, moe=small_moe(expert_ffn_dim=32, shared_ffn_dim=32)
    )
    with pytest.raises(ConfigError, match=r"of embed\.weight"):
        QuantConfig(group_size=32).check_fits(cfg)
    with pytest.raises(ConfigError, match=r"of layers\.0\.attn\.wq\.weight"):  # the next one it misses
        QuantConfig(group_size=32, embedding="int8").check_fits(cfg)


_SAVE_IN_A_NEW_PROCESS = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from shapes import tiny_config
from pipeline.model import Transformer
from pipeline.quant import QuantConfig
from pipeline.quant.convert import post_training_quantize
from pipeline.quant.format import save_quantized
from pathlib import Path
torch.manual_seed(0)
q = QuantConfig(group_size=16)
save_quantized(post_training_quantize(Transformer(tiny_config()), q), q, Path(sys.argv[1]))
"""


def test_the_same_model_gives_the_same_bytes_in_every_process(tmp_path):
    # safetensors writes its metadata map in a per-process hash order: without sorting
    # it, DVC would see a new quantized model on every run of the same inputs.
    import subprocess
    import sys
    from pathlib import Path

    tests_dir = str(Path(__file__).resolve().parents[1])
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for f in files:
        proc = subprocess.run(
            [sys.executable, "-c", _SAVE_IN_A_NEW_PROCESS, str(f), tests_dir], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()
    load_quantized(files[0])  # still a safetensors file this format reads

"""The converted (INT4) model rebuilt for ``torch.export`` and ExecuTorch/XNNPACK.

Shape legend: S new positions, L cache positions (max context), D model dim,
H / Hkv query / key-value heads, Dh head dim, V vocabulary, T tokens (= S, batch 1),
E routed experts, K top-k, F expert width, n tokens routed to one expert.

One method, ``forward(tokens_1S, input_pos_1) -> logits_1SV``, serves prefill (S > 1,
``input_pos`` = 0) and decode (S = 1, ``input_pos`` = tokens already in the cache). The
KV cache lives in the program as mutable buffers of L positions, updated in place, and
attention is ExecuTorch's fused SDPA, which on a global layer reads only the positions
filled so far (a windowed layer reads the whole cache under its mask;
:mod:`pipeline.export.kv_cache`).

Every matrix is 8da4w in the operator pattern XNNPACK delegates: INT4 weights (int8
storage, one FP32 scale per group) dequantized by ``dequantize_per_channel_group``, the
input quantized per token to INT8 (``choose_qparams_per_token_asymmetric``,
``quantize_per_token``, ``dequantize_per_token``), then ``linear``. XNNPACK fuses the
pattern into one dynamically quantized INT4 GEMM. These ops (rather than torchao's
tensor subclass) are used because their shape functions make no guard on the number of
rows, which for an expert depends on the data.

The MoE is sparse: the router (FP32, in the graph) picks K experts per token, and the
routed experts run in one of two forms (``moe``). ``fused`` (default): one
``mobilemoe::moe_experts_int4`` node per layer, the project's C++ kernel
(:mod:`pipeline.export.moe_op`), INT4 packed two per byte; only routed experts' weights
are read, and the graph no longer grows with the number of experts. ``xnnpack``: the
paper's fused-MoE plan in stock operators, for a runtime without the project's kernels:
the T*K routed slots sorted by expert (a counting sort), the tokens gathered once in that
order and split into one block of rows per expert (data-dependent sizes; most are empty
during decode), each block run through its expert's two XNNPACK GEMMs, the results added
back to their tokens with their gate weights; an idle expert still costs its dispatch.
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
import torch.nn.functional as F
from torch import nn

from pipeline.export.config import MOE_FORMS
from pipeline.export.kv_cache import KV_CACHE_DTYPES, KVCacheAttention, window_mask
from pipeline.export.moe_op import moe_experts_int4, pack_int4
from pipeline.export.table_ops import embedding_int4, linear_int4
from pipeline.model.config import ModelConfig
from pipeline.model.decoder import Transformer
from pipeline.model.layers import RMSNorm, apply_rope, rope_tables
from pipeline.model.moe import MoE
from pipeline.quant.convert import QuantizedEmbedding, QuantizedExperts, QuantizedWeight
from pipeline.quant.coverage import quantized_weights

INT4_MIN, INT4_MAX = -8, 7
INT8_MIN, INT8_MAX = -128, 127
# XNNPACK's INT4 GEMM takes groups of whole blocks of 32 input features.
XNNPACK_GROUP_MULTIPLE = 32


class ExportInputError(ValueError):
    """The model handed to export is not a converted INT4 model this program can hold."""


def _qd():
    return torch.ops.quantized_decomposed


class Int4Linear(nn.Module):
    """y = dequant(quant_int8_per_token(x)) @ dequant_int4(W).T, as XNNPACK fuses it."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        if weight.bits != 4:
            raise ExportInputError(f"Int4Linear needs an INT4 weight, got {weight.bits} bits")
        self.group = weight.group
        rows = weight.values.shape[0]
        self.register_buffer("values_OI", weight.values.to(torch.int8).contiguous())
        # (O, groups); per-channel weights come with 1-D scales, XNNPACK wants 2-D.
        self.register_buffer("scale_OG", weight.scale.float().reshape(rows, -1).contiguous())
        # Symmetric weights: zero points are 0; XNNPACK wants them as a tensor.
        self.register_buffer("zero_OG", torch.zeros_like(weight.scale, dtype=torch.int8))

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        qd = _qd()
        scale_N1, zero_N1 = qd.choose_qparams_per_token_asymmetric(x_ND, torch.int8)
        xq_ND = qd.quantize_per_token(x_ND, scale_N1, zero_N1, INT8_MIN, INT8_MAX, torch.int8)
        x_ND = qd.dequantize_per_token(xq_ND, scale_N1, zero_N1, INT8_MIN, INT8_MAX, torch.int8, torch.float32)
        w_OI = qd.dequantize_per_channel_group(
            self.values_OI, self.scale_OG, self.zero_OG, INT4_MIN, INT4_MAX, torch.int8, self.group, torch.float32
        )
        return F.linear(x_ND, w_OI)


def _stack_rows(*weights: QuantizedWeight) -> QuantizedWeight:
    """Concatenate weights along the output dim (groups run along the input dim, so the
    result quantizes each part exactly as before): w1 and w3 become one GEMM."""
    first = weights[0]
    return QuantizedWeight(
        torch.cat([w.values for w in weights]), torch.cat([w.scale for w in weights]), first.bits, first.group
    )


class Int4Embedding(nn.Module):
    """Lookup from a packed INT4 table (two values per byte), dequantizing only the
    rows looked up (ExecuTorch's ``embedding_4bit`` kernel)."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401 - registers embedding_4bit

        unsigned_VD = (weight.values.to(torch.int16) - INT4_MIN).to(torch.uint8)  # [-8, 7] -> [0, 15]
        # The kernel reads the even column from the high nibble, the odd one from the low.
        packed = (unsigned_VD[:, 0::2] << 4) | unsigned_VD[:, 1::2]
        self.register_buffer("packed_VD2", packed.contiguous())
        self.register_buffer("scale_VG", weight.scale.float().reshape(weight.values.shape[0], -1).contiguous())

    def forward(self, tokens_1S: torch.Tensor) -> torch.Tensor:
        return _qd().embedding_4bit(self.packed_VD2, self.scale_VG, None, INT4_MIN, INT4_MAX, tokens_1S)


class Int4TiedTable(nn.Module):
    """A tied INT4 vocabulary table stored once, for the lookup and the head
    (:mod:`pipeline.export.table_ops`, the project's kernels): ``[V, D/2]`` packed with
    ``[V, D/g]`` FP32 scales."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        self.register_buffer("packed_VH", pack_int4(weight.values, weight.group))
        self.register_buffer("scale_VG", weight.scale.float().reshape(weight.values.shape[0], -1).contiguous())

    def lookup(self, tokens_1S: torch.Tensor) -> torch.Tensor:
        """[1, S, D] float32: the tokens' rows."""
        return embedding_int4(self.packed_VH, self.scale_VG, tokens_1S)

    def head(self, x_SD: torch.Tensor) -> torch.Tensor:
        """[S, V] float32: 8da4w logits over the same table."""
        return linear_int4(x_SD, self.packed_VH, self.scale_VG)


def frozen_norm(norm: RMSNorm) -> RMSNorm:
    """A frozen FP32 copy of one of the model's norms."""
    out = RMSNorm(norm.weight.shape[0], norm.eps)
    with torch.no_grad():
        out.weight.copy_(norm.weight.float())
    out.weight.requires_grad_(False)
    return out


class CachedAttention(nn.Module):
    """GQA with QK-norm and RoPE over a KV cache of L positions (:mod:`pipeline.export.kv_cache`)."""

    def __init__(
        self, cfg: ModelConfig, attn, q: dict[str, QuantizedWeight], prefix: str, max_len: int, kv_cache: str
    ) -> None:
        super().__init__()
        self.H, self.Hkv, self.Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = attn.window
        self.wqkv = Int4Linear(_stack_rows(*(q[f"{prefix}.{w}.weight"] for w in ("wq", "wk", "wv"))))
        self.wo = Int4Linear(q[f"{prefix}.wo.weight"])
        self.q_norm = frozen_norm(attn.q_norm) if cfg.qk_norm else nn.Identity()
        self.k_norm = frozen_norm(attn.k_norm) if cfg.qk_norm else nn.Identity()
        self.cache = KVCacheAttention(max_len, cfg.n_kv_heads, cfg.head_dim, kv_cache)

    def forward(self, x_SD, cos_SDh2, sin_SDh2, start_pos, mask_SL) -> torch.Tensor:
        S = x_SD.shape[0]
        H, Hkv, Dh = self.H, self.Hkv, self.Dh
        qkv = self.wqkv(x_SD)
        q_SHDh = self.q_norm(qkv[:, : H * Dh].reshape(S, H, Dh))
        k_SHkvDh = self.k_norm(qkv[:, H * Dh : (H + Hkv) * Dh].reshape(S, Hkv, Dh))
        v_SHkvDh = qkv[:, (H + Hkv) * Dh :].reshape(S, Hkv, Dh)
        # apply_rope rotates [1, N, S, Dh]; the cache kernels take [1, S, N, Dh].
        q_1SHDh = apply_rope(q_SHDh.transpose(0, 1)[None], cos_SDh2, sin_SDh2).transpose(1, 2).contiguous()
        k_1SHkvDh = apply_rope(k_SHkvDh.transpose(0, 1)[None], cos_SDh2, sin_SDh2).transpose(1, 2).contiguous()
        out_1SHDh = self.cache(q_1SHDh, k_1SHkvDh, v_SHkvDh[None].contiguous(), start_pos, mask_SL)
        return self.wo(out_1SHDh.reshape(S, H * Dh))


class Int4SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) with w1 and w3 as one GEMM."""

    def __init__(self, w1: QuantizedWeight, w3: QuantizedWeight, w2: QuantizedWeight) -> None:
        super().__init__()
        self.width = w1.values.shape[0]
        self.w13 = Int4Linear(_stack_rows(w1, w3))
        self.w2 = Int4Linear(w2)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        h_N2F = self.w13(x_ND)
        return self.w2(F.silu(h_N2F[:, : self.width]) * h_N2F[:, self.width :])


def _expert_slice(w: QuantizedWeight, e: int) -> QuantizedWeight:
    values = w.values[e]
    return QuantizedWeight(values, w.scale[e].reshape(values.shape[0], -1), w.bits, w.group)


class FusedExperts(nn.Module):
    """All routed experts of a layer as one ``mobilemoe::moe_experts_int4`` node
    (:mod:`pipeline.export.moe_op`): INT4 packed two per byte, only routed experts run."""

    def __init__(self, qw: dict[str, QuantizedWeight]) -> None:
        super().__init__()
        w1, w3, w2 = qw["w1_EFD"], qw["w3_EFD"], qw["w2_EDF"]
        E = w1.values.shape[0]

        def packed(values_ERC: torch.Tensor, group: int) -> torch.Tensor:
            return torch.stack([pack_int4(values_ERC[e], group) for e in range(E)])

        def scales(w: QuantizedWeight) -> torch.Tensor:
            return w.scale.float().reshape(E, w.values.shape[1], -1)

        self.register_buffer("w13_EFH", packed(torch.cat([w1.values, w3.values], dim=1), w1.group))
        self.register_buffer("w13_scale_EFG", torch.cat([scales(w1), scales(w3)], dim=1).contiguous())
        self.register_buffer("w2_EDH", packed(w2.values, w2.group))
        self.register_buffer("w2_scale_EDG", scales(w2).contiguous())

    def forward(self, x_TD: torch.Tensor, gates_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        return moe_experts_int4(
            x_TD, experts_TK, gates_TK, self.w13_EFH, self.w13_scale_EFG, self.w2_EDH, self.w2_scale_EDG
        )


class PerExpertExperts(nn.Module):
    """Each expert as its own pair of XNNPACK INT4 GEMMs over its routed rows: runs on a
    stock ExecuTorch runtime, but costs graph nodes and dispatch per expert."""

    def __init__(self, qw: dict[str, QuantizedWeight], num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.experts = nn.ModuleList(
            Int4SwiGLU(*(_expert_slice(qw[k], e) for k in ("w1_EFD", "w3_EFD", "w2_EDF"))) for e in range(num_experts)
        )

    def forward(self, x_TD: torch.Tensor, gates_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        order_N, counts_E = sort_by_expert(experts_TK.reshape(-1), self.num_experts)
        token_N = order_N // self.top_k  # the token each sorted slot belongs to
        x_ND = x_TD.index_select(0, token_N)  # one gather for every expert
        sizes = counts_E.tolist()  # data-dependent rows per expert
        for n in sizes:
            torch._check(n <= x_ND.shape[0])  # a bound: memory is planned for it
        torch._check(sum(sizes) == x_ND.shape[0])
        y_ND = torch.cat([expert(rows) for expert, rows in zip(self.experts, torch.split(x_ND, sizes), strict=True)])
        gate_N = gates_TK.reshape(-1).index_select(0, order_N)
        return torch.zeros_like(x_TD).index_add(0, token_N, y_ND * gate_N[:, None])


class SparseMoE(nn.Module):
    """Router (FP32) + INT4 routed experts run only on their routed tokens + shared.

    ``form``: ``fused`` (:class:`FusedExperts`, the project's kernel) or ``xnnpack``
    (:class:`PerExpertExperts`, stock ExecuTorch)."""

    def __init__(self, moe: MoE, form: str = "fused") -> None:
        super().__init__()
        if not isinstance(moe.experts, QuantizedExperts):
            raise ExportInputError(f"experts are {type(moe.experts).__name__}, not converted INT4 experts")
        if form not in MOE_FORMS:
            raise ExportInputError(f"moe={form!r} is not one of {list(MOE_FORMS)}")
        self.cfg = moe.cfg
        self.router_ED = nn.Parameter(moe.router.weight_ED.detach().float().clone(), requires_grad=False)
        self.register_buffer("expert_bias_E", moe.router.expert_bias_E.detach().float().clone())
        qw = moe.experts.qweights
        self.routed = FusedExperts(qw) if form == "fused" else PerExpertExperts(qw, moe.cfg.num_experts, moe.cfg.top_k)
        self.shared = None
        if moe.shared is not None:
            shared = quantized_weights(moe.shared)
            self.shared = Int4SwiGLU(shared["w1.weight"], shared["w3.weight"], shared["w2.weight"])

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gates_TK, experts_TK): the router of :class:`pipeline.model.moe.Router`."""
        logits_TE = F.linear(x_TD, self.router_ED)
        scores_TE = torch.sigmoid(logits_TE) if self.cfg.score_func == "sigmoid" else torch.softmax(logits_TE, -1)
        experts_TK = torch.topk(scores_TE + self.expert_bias_E, self.cfg.top_k, dim=-1).indices
        gates_TK = scores_TE.gather(-1, experts_TK)
        if self.cfg.route_norm:
            gates_TK = gates_TK / (gates_TK.sum(-1, keepdim=True) + 1e-20)
        return gates_TK * self.cfg.route_scale, experts_TK

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        out_TD = self.routed(x_TD, *self.route(x_TD))
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        return out_TD


def sort_by_expert(experts_N: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_N, counts_E): slot indices grouped by expert (ascending expert id; slots of
    one expert in their original order) and the slots per expert.

    A counting sort from cumulative sums: ExecuTorch's Python runtime has no kernel for
    ``sort``. Slot n goes to position start[e_n] + (its rank among the slots of e_n), and
    order is the inverse of that permutation.
    """
    hit_NE = (experts_N[:, None] == torch.arange(num_experts, device=experts_N.device)).long()
    counts_E = hit_NE.sum(0)
    rank_N = (hit_NE.cumsum(0) * hit_NE).sum(1) - 1
    start_E = counts_E.cumsum(0) - counts_E
    position_N = start_E.index_select(0, experts_N) + rank_N
    slots_N = torch.arange(experts_N.shape[0], device=experts_N.device)
    return torch.zeros_like(position_N).scatter(0, position_N, slots_N), counts_E


class ExportBlock(nn.Module):
    def __init__(
        self, cfg: ModelConfig, block, q: dict[str, QuantizedWeight], i: int, max_len: int, kv_cache: str, moe: str
    ) -> None:
        super().__init__()
        p = f"layers.{i}"
        self.attn_norm = frozen_norm(block.attn_norm)
        self.attn = CachedAttention(cfg, block.attn, q, f"{p}.attn", max_len, kv_cache)
        self.ffn_norm = frozen_norm(block.ffn_norm)
        if isinstance(block.ffn, MoE):
            self.ffn: nn.Module = SparseMoE(block.ffn, moe)
        else:
            self.ffn = Int4SwiGLU(*(q[f"{p}.ffn.{w}.weight"] for w in ("w1", "w3", "w2")))

    def forward(self, x_SD, cos_SDh2, sin_SDh2, start_pos, mask_SL) -> torch.Tensor:
        x_SD = x_SD + self.attn(self.attn_norm(x_SD), cos_SDh2, sin_SDh2, start_pos, mask_SL)
        return x_SD + self.ffn(self.ffn_norm(x_SD))


class ExportableLM(nn.Module):
    """``forward(tokens_1S, input_pos_1) -> logits_1SV`` with the KV cache inside.

    ``last_logits_only``: return ``logits_11V``, the last position's only (what a
    generating runner needs, and what the export stage writes; ExecuTorch's LLM runner
    takes either). At a 128k vocabulary the head over every prompt position would
    dominate prefill.

    ``kv_cache``: the cache dtype, one of :data:`pipeline.export.kv_cache.KV_CACHE_DTYPES`.
    ``moe``: the routed experts' form, one of :data:`MOE_FORMS` (:class:`SparseMoE`); in
    the ``fused`` form (the project's kernels) a tied vocabulary table is also stored
    once (:class:`Int4TiedTable`).
    """

    def __init__(
        self,
        model: Transformer,
        max_len: int,
        last_logits_only: bool = False,
        kv_cache: str = "float32",
        moe: str = "fused",
    ) -> None:
        super().__init__()
        cfg = model.cfg
        require_converted(model)
        if not 1 <= max_len <= cfg.max_seq_len:
            raise ExportInputError(f"max_len={max_len} must be in [1, model max_seq_len={cfg.max_seq_len}]")
        self.cfg, self.max_len, self.last_logits_only = cfg, max_len, last_logits_only
        if kv_cache not in KV_CACHE_DTYPES:
            raise ExportInputError(f"kv_cache={kv_cache!r} is not one of {sorted(KV_CACHE_DTYPES)}")
        if moe not in MOE_FORMS:
            raise ExportInputError(f"moe={moe!r} is not one of {list(MOE_FORMS)}")
        q = quantized_weights(model)
        # The project's kernels (``fused``) hold a tied table once; a stock runtime takes
        # ExecuTorch's lookup and an XNNPACK head, each with its own copy.
        if moe == "fused" and cfg.tie_embeddings:
            table = Int4TiedTable(q["embed.weight"])
            self.embed, self.head = table.lookup, table.head
            self.table = table
        else:
            self.embed = Int4Embedding(q["embed.weight"])
            self.head = Int4Linear(q["embed.weight"] if cfg.tie_embeddings else q["head.weight"])
        self.layers = nn.ModuleList(
            ExportBlock(cfg, b, q, i, max_len, kv_cache, moe) for i, b in enumerate(model.layers)
        )
        self.norm = frozen_norm(model.norm)
        cos, sin = rope_tables(cfg.head_dim, max_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.windows = sorted({w for i in range(cfg.n_layers) if (w := cfg.layer_window(i))})

    def forward(self, tokens_1S: torch.Tensor, input_pos_1: torch.Tensor) -> torch.Tensor:
        S = tokens_1S.shape[1]
        start_pos = input_pos_1[0].item()
        pos_S = input_pos_1 + torch.arange(S, device=tokens_1S.device)
        cos_SDh2, sin_SDh2 = self.rope_cos.index_select(0, pos_S), self.rope_sin.index_select(0, pos_S)
        # Global layers attend causally from start_pos (no mask); windowed ones by mask.
        masks = {w: window_mask(pos_S, self.max_len, w) for w in self.windows}
        x_SD = self.embed(tokens_1S)[0]
        for layer in self.layers:
            window = layer.attn.window
            x_SD = layer(x_SD, cos_SDh2, sin_SDh2, start_pos, masks[window] if window else None)
        if self.last_logits_only:
            x_SD = x_SD[-1:]
        return self.head(self.norm(x_SD))[None]

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.attn.cache.reset()


def require_converted(model: Transformer) -> None:
    """Raise ExportInputError naming the first weight that is not real INT4 (a
    fake-quant or full-precision model given to the INT4 export)."""
    if not isinstance(model.embed, QuantizedEmbedding):
        raise ExportInputError(
            f"embed is {type(model.embed).__name__}: the INT4 export needs a converted model "
            "(QAT's quantized/model.safetensors), not a fake-quant or full-precision one"
        )
    if model.embed.qweight.bits != 4:
        raise ExportInputError(
            "embed is INT8 (quant embedding: int8); the .pte export supports the INT4 embedding only"
        )
    names = quantized_weights(model)
    for name, p in model.named_parameters():
        if p.ndim >= 2 and "router" not in name and name not in names:
            raise ExportInputError(
                f"{name} is full precision: the INT4 export needs a converted model (QAT's quantized output)"
            )
    for name, w in names.items():
        if w.bits != 4:
            raise ExportInputError(f"{name} has {w.bits}-bit weights; the program holds INT4 matrices")
        if w.group % XNNPACK_GROUP_MULTIPLE:
            raise ExportInputError(
                f"{name}: INT4 group of {w.group} input features; XNNPACK needs a multiple of "
                f"{XNNPACK_GROUP_MULTIPLE} (quantize with stage.qat.group_size 32, 64, ... or per_channel)"
            )

"""Mixture-of-Experts feed-forward: sigmoid/softmax router, grouped experts, shared expert.

Shape legend:
  T  tokens in the batch (B * S)          D  model dim
  E  routed experts                        K  experts chosen per token (top-k)
  F  hidden width of one routed expert     N  routed slots = T * K

Routing is dropless: every token reaches its K experts. Slots are sorted by expert so
each expert's tokens are contiguous, and the experts run over the 3-D expert weights
``w1_EFD``, ``w3_EFD``, ``w2_EDF``: on CPU in FP32 through the project's fused kernel
(:mod:`pipeline.model.kernels`: gather, GEMMs, SwiGLU, gate and combine in one pass per
expert), elsewhere (CUDA, BF16 autocast, QAT's fake-quantized activations, torch.compile)
through one grouped GEMM per projection (``torch._grouped_mm``). The 3-D parameters are
what QAT fake-quantizes and what export lowers; there is no list of per-expert modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.config import MoEConfig
from pipeline.model.layers import SwiGLU


@dataclass
class RouterOutput:
    gates_TK: torch.Tensor  # gate weight of each chosen expert (fp32)
    experts_TK: torch.Tensor  # chosen expert ids (int64)
    logits_TE: torch.Tensor  # raw router logits (fp32), for the z-loss
    scores_TE: torch.Tensor  # unbiased scores (fp32), for the auxiliary loss


class Router(nn.Module):
    """Top-k router. The expert bias steers *selection* only; gates use unbiased scores."""

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Kept in FP32 through training, QAT and export: routing decisions are the
        # part of an MoE most sensitive to precision.
        self.weight_ED = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        # Not trained by gradients; moved by the balancing hook (see balance.py).
        self.register_buffer("expert_bias_E", torch.zeros(cfg.num_experts))
        # Tokens routed to each expert since the last balancing update (not saved).
        self.register_buffer("tokens_per_expert_E", torch.zeros(cfg.num_experts), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        if self.weight_ED.is_meta:  # no values to set (see layers.Embedding.reset_parameters)
            return
        nn.init.normal_(self.weight_ED, 0.0, std)
        self.expert_bias_E.zero_()

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        # Autocast would run this matmul in bf16 despite the casts; keep it FP32.
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight_ED.float())
        if self.cfg.score_func == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
        else:
            scores_TE = torch.softmax(logits_TE, dim=-1)
        select_TE = scores_TE + self.expert_bias_E.float()
        experts_TK = torch.topk(select_TE, self.cfg.top_k, dim=-1, sorted=False).indices
        gates_TK = scores_TE.gather(-1, experts_TK)
        if self.cfg.route_norm:
            gates_TK = gates_TK / (gates_TK.sum(-1, keepdim=True) + 1e-20)
        gates_TK = gates_TK * self.cfg.route_scale
        return RouterOutput(gates_TK, experts_TK, logits_TE, scores_TE)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as 3-D weights, run with one grouped GEMM per projection."""

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        E, F_, D = cfg.num_experts, cfg.expert_ffn_dim, d_model
        self.w1_EFD = nn.Parameter(torch.empty(E, F_, D))  # gate projection
        self.w3_EFD = nn.Parameter(torch.empty(E, F_, D))  # up projection
        self.w2_EDF = nn.Parameter(torch.empty(E, D, F_))  # down projection
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        # A usable default on its own; Transformer.reset_parameters re-initialises with
        # its depth-scaled scheme.
        if self.w1_EFD.is_meta:  # no values to set (see layers.Embedding.reset_parameters)
            return
        for w in (self.w1_EFD, self.w3_EFD, self.w2_EDF):
            nn.init.normal_(w, 0.0, std)

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weights the forward uses. QAT overrides this to insert fake-quantization."""
        return self.w1_EFD, self.w3_EFD, self.w2_EDF

    def quantize_input(self, x_ND: torch.Tensor) -> torch.Tensor:
        """What a projection sees of its input rows (one row per routed slot, features
        last). Identity here; QAT fake-quantizes each row (per-token INT8)."""
        return x_ND

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``x_ND`` holds slots sorted by expert; ``counts_E`` how many each expert got.

        Returns (N, D) in the compute dtype: ``x_ND``'s, or autocast's where it is on.
        Autocast does not cover ``_grouped_mm``, so the cast is made here, as autocast
        would for a linear layer: on CUDA only BF16 operands take the grouped kernel (an
        FP32 call falls back to a host-synchronised loop over experts)."""
        w1_EFD, w3_EFD, w2_EDF = self.expert_weights()
        device_type = x_ND.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_ND.dtype
        x_ND = x_ND.to(dtype)
        offsets_E = torch.cumsum(counts_E, dim=0).to(torch.int32)
        x_ND = self.quantize_input(x_ND)
        h1_NF = torch._grouped_mm(x_ND, w1_EFD.to(dtype).transpose(-2, -1), offs=offsets_E)
        h3_NF = torch._grouped_mm(x_ND, w3_EFD.to(dtype).transpose(-2, -1), offs=offsets_E)
        h_NF = self.quantize_input(F.silu(h1_NF) * h3_NF)
        return torch._grouped_mm(h_NF, w2_EDF.to(dtype).transpose(-2, -1), offs=offsets_E)


def fused_applies(experts: GroupedExperts, x_TD: torch.Tensor) -> bool:
    """Whether the CPU kernel computes what ``experts`` would: CPU, FP32/FP64 without
    autocast, activations not fake-quantized (QAT's experts override quantize_input), and
    not under torch.compile (the op has no compiler kernel; the grouped path is traced)."""
    return (
        x_TD.device.type == "cpu"
        and x_TD.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
        and type(experts).quantize_input is GroupedExperts.quantize_input
        and not torch.compiler.is_compiling()
    )


def gathered_experts(
    experts: GroupedExperts, x_TD: torch.Tensor, experts_TK: torch.Tensor, gates_TK: torch.Tensor
) -> torch.Tensor:
    """Gather each token's K expert matrices and apply them with einsum.

    No data-dependent shapes, so ``torch.export`` traces it (the grouped GEMM's export
    kernel is bf16/CUDA-only). It materialises T*K weight copies: right for batch-1
    decode and short exported examples, wasteful for long prefill.
    """
    w1_EFD, w3_EFD, w2_EDF = experts.expert_weights()
    dtype = x_TD.dtype
    w1_TKFD, w3_TKFD = w1_EFD.to(dtype)[experts_TK], w3_EFD.to(dtype)[experts_TK]
    w2_TKDF = w2_EDF.to(dtype)[experts_TK]
    x_TD = experts.quantize_input(x_TD)
    h_TKF = F.silu(torch.einsum("td,tkfd->tkf", x_TD, w1_TKFD)) * torch.einsum("td,tkfd->tkf", x_TD, w3_TKFD)
    h_TKF = experts.quantize_input(h_TKF)
    y_TKD = torch.einsum("tkf,tkdf->tkd", h_TKF, w2_TKDF)
    return (y_TKD * gates_TK.to(dtype)[..., None]).sum(1)


def reference_experts(experts: GroupedExperts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """A plain Python loop over experts. For tests and benchmarks only: slow but obvious."""
    w1_EFD, w3_EFD, w2_EDF = experts.expert_weights()
    outputs = []
    start = 0
    for e, count in enumerate(counts_E.tolist()):
        x_nD = experts.quantize_input(x_ND[start : start + count])
        h_nF = experts.quantize_input(F.silu(x_nD @ w1_EFD[e].T) * (x_nD @ w3_EFD[e].T))
        outputs.append(h_nF @ w2_EDF[e].T)
        start += count
    return torch.cat(outputs, dim=0)


class MoE(nn.Module):
    """Routed experts plus optional shared expert(s); returns (output, auxiliary loss)."""

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(d_model, cfg)
        self.experts = GroupedExperts(d_model, cfg)
        # Several shared experts are mathematically one wider SwiGLU; keep one module.
        shared_width = cfg.num_shared_experts * cfg.shared_ffn_dim
        self.shared = SwiGLU(d_model, shared_width) if shared_width > 0 else None
        # "auto": "fused" where it applies (fused_applies), else "grouped";
        # "fused": the CPU kernel; "grouped": sorted dispatch + torch's grouped GEMM;
        # "gather": export-friendly (see gathered_experts); "loop": reference, tests only.
        self.dispatch = "auto"

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        route = self.router(x_TD)

        experts_N = route.experts_TK.reshape(-1)
        # scatter_add rather than bincount: a static output shape keeps torch.export happy.
        counts_E = torch.zeros(self.cfg.num_experts, dtype=torch.long, device=x_TD.device).scatter_add_(
            0, experts_N, torch.ones_like(experts_N)
        )
        dispatch = self.dispatch
        if dispatch == "auto":
            dispatch = "fused" if fused_applies(self.experts, x_TD) else "grouped"
        if dispatch == "gather":
            out_TD = gathered_experts(self.experts, x_TD, route.experts_TK, route.gates_TK)
        elif dispatch == "fused":
            out_TD = self._fused(x_TD, route)
        else:
            out_TD = self._sorted_dispatch(x_TD, route, counts_E, dispatch)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)

        if self.training:
            with torch.no_grad():
                self.router.tokens_per_expert_E += counts_E.to(self.router.tokens_per_expert_E.dtype)
        aux_loss = self._aux_loss(route, counts_E, B * S)
        return out_TD.view(B, S, D), aux_loss

    def _fused(self, x_TD: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        """The routed experts through the CPU kernel (same maths as _sorted_dispatch)."""
        from pipeline.model import kernels

        if not fused_applies(self.experts, x_TD):
            raise ValueError(
                "MoE dispatch 'fused' needs CPU tensors in float32/float64 without autocast, plain experts "
                "(no fake-quantized activations) and no torch.compile; use 'auto' or 'grouped'"
            )
        order_N, offsets_E1 = kernels.sort_slots(route.experts_TK, self.cfg.num_experts)
        w1_EFD, w3_EFD, w2_EDF = self.experts.expert_weights()
        dtype = x_TD.dtype
        gates_TK = route.gates_TK.to(dtype)
        return kernels.routed_experts(
            x_TD, gates_TK, w1_EFD.to(dtype), w3_EFD.to(dtype), w2_EDF.to(dtype), order_N, offsets_E1
        )

    def _sorted_dispatch(
        self, x_TD: torch.Tensor, route: RouterOutput, counts_E: torch.Tensor, dispatch: str
    ) -> torch.Tensor:
        """Sort slots by expert, run the experts on contiguous groups, scatter back."""
        experts_N = route.experts_TK.reshape(-1)
        order_N = torch.argsort(experts_N, stable=True)  # slots grouped by expert
        token_N = order_N // self.cfg.top_k  # which token each sorted slot came from
        x_ND = x_TD.index_select(0, token_N)
        if dispatch == "loop":
            y_ND = reference_experts(self.experts, x_ND, counts_E)
        elif dispatch == "grouped":
            y_ND = self.experts(x_ND, counts_E)
        else:
            raise ValueError(f"unknown MoE dispatch {dispatch!r} (known: auto, fused, grouped, gather, loop)")
        gate_N = route.gates_TK.reshape(-1).index_select(0, order_N).to(y_ND.dtype)
        # Under autocast y_ND is BF16 while the residual stream stays FP32.
        return torch.zeros_like(x_TD).index_add_(0, token_N, (y_ND * gate_N[:, None]).to(x_TD.dtype))

    def _aux_loss(self, route: RouterOutput, counts_E: torch.Tensor, n_tokens: int) -> torch.Tensor:
        loss = route.logits_TE.new_zeros(())
        if self.cfg.aux_loss_coef > 0:
            # Switch-style balance: E * sum_e (fraction of slots to e) * (mean score of e).
            frac_E = counts_E.float() / (n_tokens * self.cfg.top_k)
            # Sigmoid scores need not sum to 1; when every score of a token underflows to 0
            # the normaliser would be 0/0, so it is floored at the smallest normal float.
            total_T1 = route.scores_TE.sum(-1, keepdim=True).clamp_min(torch.finfo(route.scores_TE.dtype).tiny)
            probs_TE = route.scores_TE / total_T1
            loss = loss + self.cfg.aux_loss_coef * self.cfg.num_experts * (frac_E * probs_TE.mean(0)).sum()
        if self.cfg.z_loss_coef > 0:
            loss = loss + self.cfg.z_loss_coef * torch.logsumexp(route.logits_TE, dim=-1).pow(2).mean()
        return loss

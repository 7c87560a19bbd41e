"""The decoder-only transformer and its generation loop.

Shape legend: B batch, S sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.attention import Attention, KVCache
from pipeline.model.config import ModelConfig
from pipeline.model.layers import Embedding, RMSNorm, SwiGLU, rope_tables
from pipeline.model.loss import IGNORE_INDEX, linear_cross_entropy
from pipeline.model.moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MoE(cfg.d_model, cfg.moe) if cfg.moe is not None else SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(
        self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int, cache: KVCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos, sin, start_pos, cache)
        h_BSD = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoE):
            ffn_BSD, aux = self.ffn(h_BSD)
        else:
            ffn_BSD, aux = self.ffn(h_BSD), h_BSD.new_zeros((), dtype=torch.float32)
        return x_BSD + ffn_BSD, aux


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Tied: the output head reuses the embedding matrix (no second parameter).
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Computed on the CPU and moved to the default device: on the meta device (the
        # stages' checkpoint shape checks) torch would run these ops through Python
        # references that import torch._dynamo (docs/stages.md). A model built anywhere
        # but on meta gets them recomputed on its device by reset_parameters below.
        tables = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, torch.device("cpu"))
        cos, sin = (t.to(torch.get_default_device()) for t in tables)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; output projections scaled by 1/sqrt(2L) so the
        residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("wo.weight", "w2.weight", "w2_EDF")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)
        for moe in self.moe_layers():
            moe.router.expert_bias_E.zero_()
        if self.rope_cos.is_meta:
            return
        cos, sin = rope_tables(
            self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device=self.rope_cos.device
        )
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def hidden(
        self, tokens_BS: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm's output (B, S, D), the head's input, and the summed MoE
        auxiliary loss (a scalar, 0 if unused)."""
        S = tokens_BS.shape[1]
        if start_pos + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start_pos + S} positions exceeds max_seq_len={self.cfg.max_seq_len}")
        cos = self.rope_cos[start_pos : start_pos + S]
        sin = self.rope_sin[start_pos : start_pos + S]
        x_BSD = self.embed(tokens_BS)
        aux = x_BSD.new_zeros((), dtype=torch.float32)
        for block in self.layers:
            x_BSD, layer_aux = block(x_BSD, cos, sin, start_pos, cache)
            aux = aux + layer_aux
        return self.norm(x_BSD), aux

    def forward_with_aux(
        self, tokens_BS: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, S, V) and the summed MoE auxiliary loss (a scalar, 0 if unused)."""
        x_BSD, aux = self.hidden(tokens_BS, start_pos, cache)
        logits_BSV = self.embed.attend(x_BSD) if self.head is None else self.head(x_BSD)
        return logits_BSV, aux

    def summed_loss(self, tokens_BS: torch.Tensor, labels_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training's forward: the cross-entropy summed over positions whose label is not
        ``ignore_index`` (-100), an FP32 scalar in nats, and the summed MoE auxiliary
        loss. The head and the loss run as one chunked operation (:mod:`pipeline.model.loss`:
        the [B, S, V] logits are never held) wherever the head is a matrix product with
        a weight, i.e. the tied embedding in every form (plain, fake-quantized, converted)
        and a plain untied ``nn.Linear`` with a plain weight; a head of another kind (QAT's
        fake-quantized or torchao's converted untied head, which quantize their input)
        goes through its logits. Both compute the same loss."""
        x_BSD, aux = self.hidden(tokens_BS)
        operands = self.embed.head_operands(x_BSD) if self.head is None else None
        if self.head is not None and type(self.head) is nn.Linear and type(self.head.weight.data) is torch.Tensor:
            operands = (x_BSD, self.head.weight)  # not a converted head (a quantized weight subclass)
        if operands is None:
            logits_BSV = self.head(x_BSD)
            logits_NV = logits_BSV.to(torch.promote_types(logits_BSV.dtype, torch.float32)).flatten(0, 1)
            return F.cross_entropy(logits_NV, labels_BS.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"), aux
        h_BSD, W_VD = operands
        return linear_cross_entropy(h_BSD.flatten(0, 1), W_VD, labels_BS.flatten(), IGNORE_INDEX), aux

    def forward(
        self,
        tokens_BS: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
        return_aux: bool = False,
        labels_BS: torch.Tensor | None = None,
    ):
        """Logits (B, S, V); with ``return_aux`` also the MoE auxiliary loss; with
        ``labels_BS`` (B, S) instead the training pair of :meth:`summed_loss`. Flags
        (rather than only the named methods) let a DDP or FSDP2 wrapper's forward, and
        its hooks, run each of them."""
        if labels_BS is not None:
            if start_pos != 0 or cache is not None:
                raise ValueError("the training forward (labels_BS) takes whole sequences: no start_pos or cache")
            return self.summed_loss(tokens_BS, labels_BS)
        logits_BSV, aux = self.forward_with_aux(tokens_BS, start_pos, cache)
        return (logits_BSV, aux) if return_aux else logits_BSV

    def moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.layers if isinstance(block.ffn, MoE)]

    def set_moe_dispatch(self, dispatch: str) -> Transformer:
        """Switch every MoE layer's dispatch ("auto", "fused", "grouped", "gather" or "loop"; see MoE)."""
        for moe in self.moe_layers():
            moe.dispatch = dispatch
        return self


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_BS: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``prompt_BS`` with a KV cache. temperature 0 is greedy decoding.

    Returns only the new tokens (B, <= max_new_tokens); stops early when every row has
    produced ``eos_id``.
    """
    was_training = model.training
    model.eval()
    B, S = prompt_BS.shape
    total = min(S + max_new_tokens, model.cfg.max_seq_len)
    param = next(model.parameters())
    cache = KVCache(model.cfg, B, total, dtype=param.dtype, device=param.device)
    logits_BSV = model(prompt_BS, start_pos=0, cache=cache)
    new_tokens = []
    finished_B = torch.zeros(B, dtype=torch.bool, device=prompt_BS.device)
    pos = S
    while True:
        next_B = _sample(logits_BSV[:, -1].float(), temperature, top_k, generator)
        if eos_id is not None:
            next_B = torch.where(finished_B, torch.full_like(next_B, eos_id), next_B)
            finished_B |= next_B == eos_id
        new_tokens.append(next_B)
        if len(new_tokens) >= max_new_tokens or pos >= total or bool(finished_B.all()):
            break
        logits_BSV = model(next_B[:, None], start_pos=pos, cache=cache)
        pos += 1
    model.train(was_training)
    return torch.stack(new_tokens, dim=1)


def _sample(
    logits_BV: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    if temperature <= 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        kth_B1 = torch.topk(logits_BV, min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)

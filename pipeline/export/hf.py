"""A Hugging Face directory of the model in architectures ``transformers`` already has.

The MoE maps onto ``Glm4MoeForCausalLM`` and the dense twins onto ``Qwen3ForCausalLM``;
every knob is set from this project's config and checked against the model's maths:

============================  ===========================================================
this project                  Glm4Moe (Qwen3 for dense)
============================  ===========================================================
sigmoid router, expert bias   ``gate.weight``; ``e_score_correction_bias`` (selects only)
route_norm, route_scale       ``norm_topk_prob``, ``routed_scaling_factor``
E, K, F                       ``n_routed_experts``, ``num_experts_per_tok``,
                              ``moe_intermediate_size``
shared expert of width W      ``n_shared_experts`` = W / F (HF's shared width is F x n)
QK-norm per head              ``use_qk_norm`` (Qwen3: always on)
RoPE on the whole head        ``partial_rotary_factor`` 1.0 (Glm4Moe defaults to 0.5)
every layer MoE               ``first_k_dense_replace`` 0; ``n_group`` = ``topk_group`` = 1
sliding-window layers         Qwen3 ``layer_types`` + ``sliding_window`` (Glm4Moe: none)
============================  ===========================================================

What cannot be expressed exactly raises :class:`HFMappingError` naming the knob. The
weights are full precision: the converted model's INT4 weights dequantized, with the
scheme recorded under ``mobilemoe_quantization`` in ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from pipeline.configbase import from_dict
from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.model.decoder import Transformer


class HFMappingError(ValueError):
    """The architecture has a knob the target transformers class cannot express."""


def _check_moe(cfg: ModelConfig) -> None:
    moe = cfg.moe
    assert moe is not None
    problems = []
    if moe.score_func != "sigmoid":
        problems.append(f"model.moe.score_func={moe.score_func!r} (Glm4Moe routes with sigmoid scores only)")
    if moe.num_experts < 2:
        problems.append("model.moe.num_experts < 2 (Glm4Moe's group scores take the top 2 experts)")
    shared = moe.num_shared_experts * moe.shared_ffn_dim
    if shared == 0:
        problems.append("model.moe.num_shared_experts=0 (Glm4Moe always has a shared expert)")
    elif shared % moe.expert_ffn_dim:
        problems.append(
            f"model.moe.shared_ffn_dim: shared width {shared} is not a multiple of expert_ffn_dim "
            f"{moe.expert_ffn_dim} (Glm4Moe's shared width is n_shared_experts x moe_intermediate_size)"
        )
    if cfg.sliding_window is not None and cfg.global_every != 1:
        problems.append(f"model.sliding_window={cfg.sliding_window} (Glm4Moe has no sliding-window layers)")
    if problems:
        raise HFMappingError("cannot export to Glm4MoeForCausalLM exactly: " + "; ".join(problems))


def hf_config(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int, quantization: dict | None = None):
    """The transformers config that computes what ``cfg`` computes (see module doc)."""
    from transformers import Glm4MoeConfig, Qwen3Config

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        initializer_range=cfg.init_std,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.moe is not None:
        _check_moe(cfg)
        moe = cfg.moe
        out = Glm4MoeConfig(
            **common,
            rope_parameters={**rope, "partial_rotary_factor": 1.0},
            intermediate_size=moe.num_shared_experts * moe.shared_ffn_dim,  # dense layers: none
            moe_intermediate_size=moe.expert_ffn_dim,
            num_experts_per_tok=moe.top_k,
            n_routed_experts=moe.num_experts,
            n_shared_experts=moe.num_shared_experts * moe.shared_ffn_dim // moe.expert_ffn_dim,
            routed_scaling_factor=moe.route_scale,
            norm_topk_prob=moe.route_norm,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            use_qk_norm=cfg.qk_norm,
            num_nextn_predict_layers=0,
        )
    else:
        if not cfg.qk_norm:
            raise HFMappingError("cannot export to Qwen3ForCausalLM exactly: model.qk_norm=false (Qwen3 always norms)")
        windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]
        out = Qwen3Config(
            **common,
            rope_parameters=rope,
            intermediate_size=cfg.ffn_dim,
            use_sliding_window=cfg.sliding_window is not None,
            sliding_window=cfg.sliding_window,
            max_window_layers=0,
            layer_types=["full_attention" if w is None else "sliding_attention" for w in windows],
        )
    out.architectures = [type(out).__name__.replace("Config", "ForCausalLM")]
    out.mobilemoe_model = asdict(cfg)  # the exact source config, for the reader
    if quantization is not None:
        out.mobilemoe_quantization = quantization
    return out


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's FP32 weights under the transformers module names (in memory)."""
    cfg = model.cfg
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.head.weight
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}"
        a = block.attn
        out.update(
            {
                f"{p}.input_layernorm.weight": block.attn_norm.weight,
                f"{p}.post_attention_layernorm.weight": block.ffn_norm.weight,
                f"{p}.self_attn.q_proj.weight": a.wq.weight,
                f"{p}.self_attn.k_proj.weight": a.wk.weight,
                f"{p}.self_attn.v_proj.weight": a.wv.weight,
                f"{p}.self_attn.o_proj.weight": a.wo.weight,
            }
        )
        if cfg.qk_norm:
            out[f"{p}.self_attn.q_norm.weight"] = a.q_norm.weight
            out[f"{p}.self_attn.k_norm.weight"] = a.k_norm.weight
        ffn = block.ffn
        if cfg.moe is None:
            out.update({f"{p}.mlp.{hf}_proj.weight": getattr(ffn, w).weight for hf, w in _SWIGLU})
            continue
        out[f"{p}.mlp.gate.weight"] = ffn.router.weight_ED
        out[f"{p}.mlp.gate.e_score_correction_bias"] = ffn.router.expert_bias_E
        out[f"{p}.mlp.experts.gate_up_proj"] = torch.cat((ffn.experts.w1_EFD, ffn.experts.w3_EFD), dim=1)
        out[f"{p}.mlp.experts.down_proj"] = ffn.experts.w2_EDF
        out.update({f"{p}.mlp.shared_experts.{hf}_proj.weight": getattr(ffn.shared, w).weight for hf, w in _SWIGLU})
    return {k: v.detach().float().contiguous() for k, v in out.items()}


_SWIGLU = (("gate", "w1"), ("up", "w3"), ("down", "w2"))


def save_hf(
    model: Transformer, out_dir: Path, tokenizer_json: Path, special: dict[str, str], quantization: dict
) -> Path:
    """Write ``out_dir`` (config, safetensors weights, tokenizer, generation config) from a
    full-precision ``model``. ``special`` maps bos/eos/pad to their token strings."""
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    raw = RawTokenizer.from_file(str(tokenizer_json))
    ids = {k: raw.token_to_id(v) for k, v in special.items()}
    unknown = [f"{k}={special[k]!r}" for k, v in ids.items() if v is None]
    if unknown:
        raise HFMappingError(f"{tokenizer_json}: no token for {', '.join(unknown)}")
    config = hf_config(model.cfg, ids["bos"], ids["eos"], ids["pad"], quantization)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = hf_state_dict(model)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise HFMappingError(f"weights do not map: missing {missing}, unexpected {unexpected}")
    if model.cfg.tie_embeddings:
        hf_model.tie_weights()
    hf_model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"], do_sample=False
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=special["bos"], eos_token=special["eos"], pad_token=special["pad"]
    )
    tok.save_pretrained(out_dir)
    return out_dir


def load_hf(path: Path) -> Transformer:
    """This project's model from a directory written by :func:`save_hf` (weights read by
    transformers, mapped back by name)."""
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(path) / "config.json").read_text())
    if "mobilemoe_model" not in config:
        raise HFMappingError(f"{path}: config.json has no mobilemoe_model (not written by this project)")
    raw = dict(config["mobilemoe_model"])
    if raw.get("moe") is not None:
        raw["moe"] = asdict(from_dict(MoEConfig, raw["moe"], "model.moe"))
    cfg = from_dict(ModelConfig, raw, "model")
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    theirs = hf_model.state_dict()
    model = Transformer(cfg)
    mine = model.state_dict()
    with torch.no_grad():
        for ours, hf_name in hf_names(model).items():
            mine[ours].copy_(theirs[hf_name])
        for i in range(cfg.n_layers if cfg.moe is not None else 0):
            w1_EFD, w3_EFD = theirs[f"model.layers.{i}.mlp.experts.gate_up_proj"].chunk(2, dim=1)
            mine[f"layers.{i}.ffn.experts.w1_EFD"].copy_(w1_EFD)
            mine[f"layers.{i}.ffn.experts.w3_EFD"].copy_(w3_EFD)
    return model.eval()


def hf_names(model: Transformer) -> dict[str, str]:
    """Our state-dict name -> the transformers name (gate/up of experts: see load_hf)."""
    out = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not model.cfg.tie_embeddings:
        out["head.weight"] = "lm_head.weight"
    for i in range(model.cfg.n_layers):
        p, h = f"layers.{i}", f"model.layers.{i}"
        out.update(
            {
                f"{p}.attn_norm.weight": f"{h}.input_layernorm.weight",
                f"{p}.ffn_norm.weight": f"{h}.post_attention_layernorm.weight",
                **{f"{p}.attn.{w}.weight": f"{h}.self_attn.{w[1]}_proj.weight" for w in ("wq", "wk", "wv", "wo")},
            }
        )
        if model.cfg.qk_norm:
            out[f"{p}.attn.q_norm.weight"] = f"{h}.self_attn.q_norm.weight"
            out[f"{p}.attn.k_norm.weight"] = f"{h}.self_attn.k_norm.weight"
        if model.cfg.moe is None:
            out.update({f"{p}.ffn.{w}.weight": f"{h}.mlp.{hf}_proj.weight" for hf, w in _SWIGLU})
            continue
        out[f"{p}.ffn.router.weight_ED"] = f"{h}.mlp.gate.weight"
        out[f"{p}.ffn.router.expert_bias_E"] = f"{h}.mlp.gate.e_score_correction_bias"
        out[f"{p}.ffn.experts.w2_EDF"] = f"{h}.mlp.experts.down_proj"
        out.update({f"{p}.ffn.shared.{w}.weight": f"{h}.mlp.shared_experts.{hf}_proj.weight" for hf, w in _SWIGLU})
    return out


def dequantized(model: Transformer) -> Transformer:
    """A full-precision model holding a converted model's weights dequantized (FP32)."""
    from pipeline.quant.coverage import quantized_weights

    plain = Transformer(replace(model.cfg))
    q = quantized_weights(model)
    state = plain.state_dict()
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if name in state and name not in q and type(value) is torch.Tensor:
                state[name].copy_(value)
        for name, w in q.items():
            state[name].copy_(w.dequantize())
    return plain.eval()

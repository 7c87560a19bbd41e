"""The same weights through three runtimes, timed side by side (``make bench-peers``).

A dense model at MobileLLM-Pro width (``--layers`` layers, vocab 4096, global attention:
llama.cpp's Qwen3 has no sliding window), random weights, INT4 8da4w with groups of 32:

(a) this project's program (``ExportableLM`` -> XNNPACK; last-position logits);
(b) its HF directory (Qwen3) exported by optimum-executorch (custom SDPA and KV cache,
    8da4w g32, 4-bit embedding) in its own venv (it pins transformers 5.0.0rc1);
(c) the HF directory written as a GGUF by :func:`write_gguf` (llama.cpp's converter
    refuses the recipe's tokenizer) with every INT4 matrix stored as Q4_0 blocks holding
    the model's own INT4 values and group scales (Q4_0 is 32 signed 4-bit values and one
    FP16 scale: the same grid, the scale rounded to FP16), run by llama-cpp-python in
    its own venv (built from source).

Each round runs every peer once, in its own process (model load outside the timing):
a prompt of random tokens, then ``--decode`` decode steps. Medians over rounds; decode as
a fraction of the bound (the read bandwidth over the bytes an ideal decode step reads,
``decode_read_bytes``; the same bytes for all three, Q4_0 is 4.5 bits per weight like
INT4 with an FP16 scale per 32). Teacher-forced top-1 agreement with the eager INT4 model
on one prompt says whether each peer runs the same model: optimum-executorch quantizes
the dequantized weights again with its own scale rule, and each runtime rounds
activations its own way (llama.cpp per block of 32, not per token), so on random weights,
whose logits are nearly flat, agreement is well below 100% even for the same weights.

    python bench/bench_peers.py run --out outputs/bench_peers      (main venv; calls the others)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / ".venv-peers"
VOCAB = 4096


def _model_cfg(layers: int):
    from pipeline.recipe import compose, validate

    cfg = validate(compose(["model=mobilellm_pro"])).model
    return replace(cfg, n_layers=layers, vocab_size=VOCAB, sliding_window=None, name="pro_width_peer")


def build(out: Path, layers: int, max_context: int) -> dict:
    """(main venv) ours.pte, hf/, int4.npz (the INT4 values and group scales under their HF
    names) and the eager model's teacher-forced top-1 on one prompt."""
    import numpy as np
    import torch

    from pipeline.data.tokenizer import BOS, EOS, PAD
    from pipeline.export.hf import dequantized, hf_names, save_hf
    from pipeline.export.runner import EagerRunner
    from pipeline.profile.programs import lower_model, random_int4
    from pipeline.quant.coverage import quantized_weights

    out.mkdir(parents=True, exist_ok=True)
    cfg = _model_cfg(layers)
    model, _ = random_int4(cfg, 32, seed=0)
    lower_model(model, max_context, last_logits_only=True, bos_id=0, eos_id=1).write(out / "ours.pte")
    tokenizer = ROOT / "data" / "mix" / "tokenizer" / "tokenizer.json"
    save_hf(dequantized(model), out / "hf", tokenizer, {"bos": BOS, "eos": EOS, "pad": PAD}, {"weights": "dequantized"})

    names = hf_names(model)
    int4 = {}
    for name, w in quantized_weights(model).items():
        if w.bits != 4 or w.group != 32:
            raise ValueError(f"{name}: {w.bits}-bit, group {w.group}; Q4_0 holds INT4 groups of 32")
        int4[f"{names[name]}.values"] = w.values.to(torch.int8).numpy()
        int4[f"{names[name]}.scale"] = w.scale.float().reshape(w.values.shape[0], -1).numpy()
    np.savez(out / "int4.npz", **int4)
    prompt = torch.randint(0, VOCAB, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    eager = EagerRunner(model, max_context).logits(prompt, 0)
    (out / "reference.json").write_text(json.dumps({"prompt": prompt, "top1": eager.argmax(-1).tolist()}))
    return {"config": cfg.name, "layers": layers}


def q4_0_blocks(values_OI, scale_OG):
    """INT4 values ``[O, I]`` in [-8, 7] with one scale per 32 inputs ``[O, I/32]`` as
    ggml's Q4_0 bytes ``[O, I/32 * 18]``: per block an FP16 scale d, then 16 bytes whose
    low nibbles hold values 0-15 and high nibbles values 16-31, each stored as v + 8
    (ggml's dequantize_row_q4_0: x = (nibble - 8) * d)."""
    import numpy as np

    rows, cols = values_OI.shape
    q = (values_OI.astype(np.int16) + 8).astype(np.uint8).reshape(rows, cols // 32, 32)
    packed = q[:, :, :16] | (q[:, :, 16:] << 4)
    d = scale_OG.astype(np.float16).reshape(rows, cols // 32, 1).view(np.uint8)
    return np.concatenate([d, packed], axis=-1).reshape(rows, cols // 32 * 18)


def write_gguf(hf: Path, int4_npz: Path, path: Path) -> None:
    """(llama.cpp venv) The Qwen3 HF directory as a GGUF, with the recipe's byte-level BPE
    tokenizer (GPT-2 pre-tokenizer), tensors under llama.cpp's names: the INT4 matrices
    of ``int4_npz`` as Q4_0 (:func:`q4_0_blocks`), norms in F32."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    int4 = np.load(int4_npz)
    config = json.loads((hf / "config.json").read_text())
    tok = json.loads((hf / "tokenizer.json").read_text())
    weights = load_file(str(hf / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    rope = config.get("rope_parameters") or config
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    vocab = tok["model"]["vocab"]
    special = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_add_bos_token(False)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(config["num_hidden_layers"]):
        for hf_name, gg in per_layer.items():
            names[f"model.layers.{i}.{hf_name}.weight"] = f"blk.{i}.{gg}.weight"
    for name, tensor in weights.items():
        if name not in names:
            raise KeyError(f"{hf}: tensor {name} has no GGUF name")
        if f"{name}.values" in int4:
            blocks = q4_0_blocks(int4[f"{name}.values"], int4[f"{name}.scale"])
            w.add_tensor(names[name], blocks, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            w.add_tensor(names[name], np.ascontiguousarray(tensor, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def time_pte(path: Path, prompt_len: int, decode: int, threads: int, reference: Path) -> dict:
    """(a venv with ExecuTorch) One timed generation of a .pte with forward(tokens, input_pos)."""
    import executorch.kernels.quantized  # noqa: F401
    import torch
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    portable_lib._unsafe_reset_threadpool(threads)
    program = Runtime.get().load_program(str(path))
    method = program.load_method("forward")
    # This project's programs take the start position ([1]); optimum-executorch's the
    # position of every new token (cache_position, [S]), as ExecuTorch's runner passes it.
    per_token = program.metadata("forward").input_tensor_meta(1).sizes()[0] > 1

    def positions(start: int, n: int):
        return torch.arange(start, start + n) if per_token else torch.tensor([start])

    tokens = torch.randint(0, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    for _ in range(2):  # the first pass warms up (first-call allocations, caches); the second is timed
        started = time.perf_counter()
        method.execute([tokens, positions(0, prompt_len)])
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(decode):
            method.execute([torch.tensor([[7]]), positions(prompt_len + i, 1)])
        decoded = time.perf_counter() - started
    ref = json.loads(reference.read_text())
    top1 = []
    for pos, token in enumerate(ref["prompt"]):  # teacher-forced, one token per step
        top1.append(int(method.execute([torch.tensor([[token]]), positions(pos, 1)])[0].reshape(-1).argmax()))
    agree = sum(a == b for a, b in zip(top1, ref["top1"], strict=True)) / len(top1)
    return {"prefill_tok_s": prompt_len / prefill, "decode_tok_s": decode / decoded, "top1_agree": agree}


def time_gguf(path: Path, prompt_len: int, decode: int, threads: int, reference: Path) -> dict:
    """(llama.cpp venv) The same generation through llama-cpp-python."""
    import random

    import llama_cpp

    # Threads for prefill too (it defaults to every core), and an FP32 KV cache like the
    # other two programs' (llama.cpp defaults to F16).
    llm = llama_cpp.Llama(
        str(path), n_ctx=prompt_len + decode + 8, n_batch=prompt_len, n_threads=threads, n_threads_batch=threads,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False,
    )  # fmt: skip
    rng = random.Random(prompt_len)
    tokens = [rng.randrange(VOCAB) for _ in range(prompt_len)]
    for _ in range(2):  # as time_pte: the second pass is timed
        llm.reset()
        started = time.perf_counter()
        llm.eval(tokens)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(decode):
            llm.eval([7])
        decoded = time.perf_counter() - started
    ref = json.loads(reference.read_text())
    # Teacher-forced: one prefill of the reference prompt with every row's logits kept.
    every = llama_cpp.Llama(str(path), n_ctx=len(ref["prompt"]) + 8, n_batch=len(ref["prompt"]),
                            n_threads=threads, logits_all=True, verbose=False)  # fmt: skip
    every.eval(ref["prompt"])
    top1 = every.scores[: len(ref["prompt"])].argmax(-1).tolist()
    agree = sum(a == b for a, b in zip(top1, ref["top1"], strict=True)) / len(top1)
    return {"prefill_tok_s": prompt_len / prefill, "decode_tok_s": decode / decoded, "top1_agree": agree}


def _venv_python(name: str) -> str:
    python = VENVS / name / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python}: missing; make bench-peers builds the peers' venvs first")
    return str(python)


def _in(python: str, *args: str) -> dict:
    run = subprocess.run([python, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        raise SystemExit(f"{' '.join(args[:1])} in {python} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def run(args) -> None:
    """(main venv) Build, export through each peer, time rounds side by side, print the table."""
    from pipeline.model.accounting import decode_read_bytes
    from pipeline.profile.artifacts import decode_positions
    from pipeline.profile.system import machine, read_bandwidth_gb_s

    out = Path(args.out).resolve()
    info = build(out, args.layers, max(args.prompts) + args.decode + 8)
    optimum, llama = _venv_python("optimum"), _venv_python("llamacpp")
    if not (out / "optimum" / "model.pte").is_file():
        subprocess.run(
            [str(Path(optimum).parent / "optimum-cli"), "export", "executorch", "--model", str(out / "hf"),
             "--task", "text-generation", "--recipe", "xnnpack", "--use_custom_sdpa", "--use_custom_kv_cache",
             "--qlinear", "8da4w", "--qlinear_group_size", "32", "--qembedding", "4w",
             "--max_seq_len", str(max(args.prompts) + args.decode + 8), "--output_dir", str(out / "optimum")],
            check=True, cwd=ROOT,
        )  # fmt: skip
    _in(llama, "gguf", str(out / "hf"), str(out / "int4.npz"), str(out / "model-q4_0.gguf"))
    peers = {
        "this project (.pte)": (sys.executable, "time-pte", out / "ours.pte"),
        "optimum-executorch (.pte)": (optimum, "time-pte", out / "optimum" / "model.pte"),
        "llama.cpp (GGUF Q4_0)": (llama, "time-gguf", out / "model-q4_0.gguf"),
    }
    bandwidth = read_bandwidth_gb_s(512, args.threads)["gb_s"]
    results: dict = {name: {n: [] for n in args.prompts} for name in peers}
    for _ in range(args.rounds):
        for n in args.prompts:
            for name, (python, cmd, path) in peers.items():
                argv = (str(path), str(n), str(args.decode), str(args.threads), str(out / "reference.json"))
                results[name][n].append(_in(python, cmd, *argv))
    cfg = _model_cfg(args.layers)
    rows = []
    for n in args.prompts:
        read = decode_read_bytes(cfg, decode_positions(n, args.decode), 32, kv_dtype_bytes=4)
        bound = bandwidth * 1e9 / read["total"]
        ours = statistics.median(r["decode_tok_s"] for r in results["this project (.pte)"][n])
        for name in peers:
            runs = results[name][n]
            dec = statistics.median(r["decode_tok_s"] for r in runs)
            rows.append({
                "peer": name, "prompt": n, "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in runs),
                "decode_tok_s": dec, "decode_fraction_of_bound": dec / bound, "ours_over_peer_decode": ours / dec,
                "top1_agree": runs[0]["top1_agree"],
            })  # fmt: skip
    report = {"machine": machine(args.threads), "bandwidth_gb_s": bandwidth, "model": info, "args": vars(args)}
    (out / "peers.json").write_text(json.dumps({**report, "rows": rows, "runs": results}, indent=2, default=str))
    print(f"{info['layers']} layers at MobileLLM-Pro width, vocab {VOCAB}; read bandwidth {bandwidth:.1f} GB/s")
    print("| peer | prompt | prefill tok/s | decode tok/s | decode / bound | ours / peer (decode) | top-1 vs eager |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['peer']} | {r['prompt']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.0f} "
            f"| {r['decode_fraction_of_bound']:.0%} | {r['ours_over_peer_decode']:.2f}x | {r['top1_agree']:.0%} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default="outputs/bench_peers")
    r.add_argument("--layers", type=int, default=2)
    r.add_argument("--prompts", type=int, nargs="+", default=[64, 1024])
    r.add_argument("--decode", type=int, default=32)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--rounds", type=int, default=3)
    g = sub.add_parser("gguf")
    g.add_argument("hf")
    g.add_argument("int4")
    g.add_argument("q4")
    for name in ("time-pte", "time-gguf"):
        t = sub.add_parser(name)
        for arg in ("path", "prompt", "decode", "threads", "reference"):
            t.add_argument(arg)
    args = parser.parse_args()
    if args.cmd == "run":
        run(args)
    elif args.cmd == "gguf":
        write_gguf(Path(args.hf), Path(args.int4), Path(args.q4))
        print(json.dumps({"q4": args.q4}))
    else:
        fn = time_pte if args.cmd == "time-pte" else time_gguf
        one = fn(Path(args.path), int(args.prompt), int(args.decode), int(args.threads), Path(args.reference))
        print(json.dumps(one))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

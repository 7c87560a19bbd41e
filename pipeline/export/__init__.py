"""Export of the converted model: ExecuTorch (.pte, XNNPACK), torch.export (.pt2), and a
Hugging Face directory; runners and equivalence checks for each.

Modules: program (the model rebuilt for export), xnnpack_shim (the one partitioner
workaround), lower (.pt2/.pte and the operator table), runner (prefill/decode drivers),
checks (cosine, SQNR, greedy agreement), hf (Glm4Moe/Qwen3 directories and reader).
"""

"""The .pte through ExecuTorch's own LLM runner (``TextLLMRunner``: what a phone app links),
against the eager converted model.

The runner takes text, tokenizes it with ExecuTorch's C++ tokenizer (the recipe's
``tokenizer.json``), prefills, and decodes greedily through the program's KV cache. Its
text is compared with the eager model's greedy continuation of the same token ids. The
runner reads special-token strings inside the text ("<|end|>") as the special tokens,
as the ``tokenizers`` library does by default; the recipe's own Tokenizer reads them as
plain text (training data may quote them). The eager side is fed the runner's
tokenization, and the prompts tokenized differently are counted: an app that passes
user text to the runner lets that text end a turn. A
free-running continuation flips at the first near-tie on some CPU (checks.py), so where
the two texts part, the eager model's top-1 margin at that token must be within the
rounding's reach (the same tie band as the export gate: ``tie_factor`` x 2 x the largest
logit change one-step rounding made there); a parting beyond it fails.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.export.checks import top1_margin
from pipeline.export.noise import noise_floor
from pipeline.export.runner import EagerRunner, greedy


def runner_text(pte: Path, tokenizer_json: Path, prompt: str, new_tokens: int) -> str:
    """Greedy text of ``new_tokens`` tokens from ExecuTorch's ``TextLLMRunner`` (no BOS
    added: the caller's prompt is used as it is)."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from pipeline.export.kernels import load_kernels

    load_kernels(pte)

    runner = TextLLMRunner(str(pte), str(tokenizer_json))
    pieces: list[str] = []
    config = GenerationConfig(echo=False, max_new_tokens=new_tokens, temperature=0.0, num_bos=0, num_eos=0)
    runner.generate(prompt, config, token_callback=pieces.append)
    return "".join(pieces)


def llm_runner_parity(
    pte: Path,
    tokenizer_json: Path,
    tokenizer,
    model,
    prompts: list[list[int]],
    new_tokens: int,
    max_context: int,
    noise_fraction: float,
    noise_draws: int,
    tie_factor: float,
) -> dict:
    """Per held-out prompt (token ids, decoded to the text the runner is given): the
    runner's text against the eager ``model``'s greedy continuation (module doc).
    Returns agreeing prompts, the tokens each agreed for, the partings at a near-tie and
    those beyond it, and ``passed``. ``tokenizer`` is the recipe's Tokenizer."""
    from tokenizers import Tokenizer as RunnerTokenizer  # default settings: as the runner reads the file

    as_runner = RunnerTokenizer.from_file(str(tokenizer_json))
    agreed, ties, beyond, tokens_equal, unlike = 0, 0, 0, [], 0
    for ids in prompts:
        text = tokenizer.decode(ids)
        prompt = as_runner.encode(text, add_special_tokens=False).ids
        unlike += prompt != tokenizer.encode(text)
        got = runner_text(pte, tokenizer_json, text, new_tokens)
        want = greedy(EagerRunner(model, max_context), prompt, new_tokens)
        same = 0
        while same < len(want) and got.startswith(tokenizer.decode(want[: same + 1])):
            same += 1
        tokens_equal.append(same)
        if same == len(want):
            agreed += 1
            continue
        seq = prompt + want[:same]
        floor = noise_floor(model, [seq], noise_draws, noise_fraction)
        row = len(seq) - 1  # the row eager chose its token ``same`` from
        margin = float(top1_margin(floor.logits_PV[row : row + 1])[0])
        if margin <= tie_factor * 2 * float(floor.max_abs_P[row]):
            ties += 1
        else:
            beyond += 1
    return {
        "prompts": len(prompts),
        "agreed": agreed,
        "parted_at_near_tie": ties,
        "parted_beyond_noise": beyond,
        "tokens_equal_min": min(tokens_equal),
        "tokenized_unlike_the_recipe": unlike,
        "passed": beyond == 0,
    }

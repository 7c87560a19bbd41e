"""The scoring harness: lm-eval's three request types over this recipe's models.

:class:`TorchLM` serves any eager model (FP32 checkpoint or converted INT4) in batches;
:class:`ProgramLM` serves an ExecuTorch ``.pte`` for generation. Both speak text: the
context/continuation split, BOS and the chat template are decided here, once, so that
this harness and the lm-eval adapter (``pipeline/eval/lm_eval_model.py``, which calls
the same methods) score the same tokens.

Batching: sequences are right-padded. Attention is causal and routing is per token
(dropless), so padding after a sequence never changes its logits; a test checks batched
against one-at-a-time scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.data.chat import render_prompt
from pipeline.data.tokenizer import Tokenizer


class EvalInputError(ValueError):
    """A request does not fit the model (e.g. longer than its context)."""


@dataclass(frozen=True)
class GenerationRequest:
    """Greedy decoding of ``context`` until a stop string, end of turn or ``max_tokens``.
    ``chat`` renders the context as one user turn and stops at ``<|end|>``."""

    context: str
    until: tuple[str, ...] = ("\n\n",)
    max_tokens: int = 64
    chat: bool = False


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace onto the continuation (lm-eval's
    convention), so "Answer: " + "42" and "Answer:" + " 42" are scored alike."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def truncate_at_stop(text: str, until: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the first stop string; whether one was found."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class TextEncoder:
    """Text -> ids as every request sees them: BOS, then the text (or the chat prompt)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Ids of ``[BOS] + context`` and of the continuation: the encoding of the whole
        text after the context's own tokens (lm-eval's split). Raises EvalInputError
        when BPE merges across the boundary (the context's tokens are not a prefix of
        the whole's, or nothing of the continuation is left): that request's score would
        not be the continuation's."""
        context, continuation = split_pair(context, continuation)
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        if whole[: len(ctx)] != ctx or len(whole) == len(ctx):
            raise EvalInputError(
                f"the continuation {continuation[:40]!r} merges into the context's last token "
                f"({context[-40:]!r}); start it with a space or a newline"
            )
        return [self.tokenizer.bos_id, *ctx], whole[len(ctx) :]

    def prompt(self, request: GenerationRequest) -> list[int]:
        if request.chat:
            return render_prompt([{"role": "user", "content": request.context}], self.tokenizer)
        return [self.tokenizer.bos_id, *self.tokenizer.encode(request.context)]

    def stop_ids(self) -> frozenset[int]:
        """End of text, and end of turn: an instruction-tuned model given a plain
        prompt still ends its answer with ``<|end|>``."""
        return frozenset((self.tokenizer.eos_id, self.tokenizer.end_id))


class TorchLM:
    """Batched scoring with an eager model ``(B, S) -> logits (B, S, V)``."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.enc = TextEncoder(tokenizer)
        self.batch_size = batch_size
        self.max_len = int(model.cfg.max_seq_len)

    # -- the three request types -------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``(log p(continuation | context) in nats, whether greedy decoding would
        produce exactly the continuation)`` per request."""
        pairs = [self.enc.pair(c, x) for c, x in requests]
        return self._score(pairs)

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """``log p(text | BOS)`` in nats per text (every token of the text scored)."""
        bos = self.enc.tokenizer.bos_id
        return [lp for lp, _ in self._score([([bos], self.enc.tokenizer.encode(t)) for t in texts])]

    def generate_until(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Greedy continuations, cut at the first stop string."""
        out: list[str] = [""] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].context))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, text in zip(chunk, self._generate([requests[i] for i in chunk]), strict=True):
                out[i] = text
        return out

    # -- internals -----------------------------------------------------------------------
    def _check_len(self, n: int) -> None:
        if n > self.max_len:
            raise EvalInputError(f"a request of {n} tokens exceeds the model's context of {self.max_len}")

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        # Longest first: similar lengths share a batch, and a too-long request fails early.
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            seqs = [pairs[i][0] + pairs[i][1] for i in chunk]
            for n in map(len, seqs):
                self._check_len(n - 1)
            width = max(len(s) for s in seqs) - 1
            tokens_BS = torch.full((len(chunk), width), self.enc.tokenizer.pad_id, dtype=torch.long)
            for row, s in enumerate(seqs):
                tokens_BS[row, : len(s) - 1] = torch.tensor(s[:-1])
            logprobs_BSV = torch.log_softmax(self.model(tokens_BS).float(), dim=-1)
            for row, i in enumerate(chunk):
                ctx, cont = pairs[i]
                # Position p predicts token p + 1: the continuation's predictions start
                # at the context's last position.
                span = slice(len(ctx) - 1, len(ctx) - 1 + len(cont))
                target_C = torch.tensor(cont)
                lp_CV = logprobs_BSV[row, span]
                logprob = float(lp_CV.gather(1, target_C[:, None]).sum())
                greedy = bool((lp_CV.argmax(dim=-1) == target_C).all())
                results[i] = (logprob, greedy)
        return results

    @torch.no_grad()
    def _generate(self, requests: list[GenerationRequest]) -> list[str]:
        prompts = [self.enc.prompt(r) for r in requests]
        budget = max(r.max_tokens for r in requests)
        for p, r in zip(prompts, requests, strict=True):
            self._check_len(len(p) + r.max_tokens - 1)  # the last new token is never fed back
        lengths = [len(p) for p in prompts]
        tokens_BS = torch.full((len(prompts), max(lengths) + budget), self.enc.tokenizer.pad_id, dtype=torch.long)
        for row, p in enumerate(prompts):
            tokens_BS[row, : len(p)] = torch.tensor(p)
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        # No KV cache: each step recomputes the (short) batch, so rows of different
        # lengths advance together without per-row cache positions.
        for _ in range(budget):
            width = max(lengths[row] for row in range(len(prompts)) if not done[row])
            logits_BSV = self.model(tokens_BS[:, :width])
            for row, r in enumerate(requests):
                if done[row]:
                    continue
                token = int(logits_BSV[row, lengths[row] - 1].argmax())
                if token in self.enc.stop_ids():
                    done[row] = True
                    continue
                new[row].append(token)
                tokens_BS[row, lengths[row]] = token
                lengths[row] += 1
                text = self.enc.tokenizer.decode(new[row])
                if len(new[row]) >= r.max_tokens or truncate_at_stop(text, r.until)[1]:
                    done[row] = True
            if all(done):
                break
        return [
            truncate_at_stop(self.enc.tokenizer.decode(ids), r.until)[0] for ids, r in zip(new, requests, strict=True)
        ]


class ProgramLM:
    """Generation with an ExecuTorch program (prefill, then one decode step per token,
    through its KV cache): what the phone runs."""

    def __init__(self, program_path, tokenizer: Tokenizer) -> None:
        from pipeline.export.runner import PteRunner

        self.runner = PteRunner(program_path)
        self.enc = TextEncoder(tokenizer)

    def generate_until(self, requests: Sequence[GenerationRequest]) -> list[str]:
        out = []
        for r in requests:
            prompt = self.enc.prompt(r)
            self.runner.check_room(0, len(prompt) + r.max_tokens - 1)
            logits = self.runner.logits(prompt, 0)
            ids: list[int] = []
            pos = len(prompt)
            while True:
                token = int(logits[-1].argmax())
                if token in self.enc.stop_ids():
                    break
                ids.append(token)
                if len(ids) >= r.max_tokens or truncate_at_stop(self.enc.tokenizer.decode(ids), r.until)[1]:
                    break
                logits = self.runner.logits([token], pos)
                pos += 1
            out.append(truncate_at_stop(self.enc.tokenizer.decode(ids), r.until)[0])
        return out


def bits_per_byte(logprob_nats: float, n_bytes: int) -> float:
    """``-log2 p(text) / bytes``: the tokenizer-independent cross-entropy (nats -> bits)."""
    return -logprob_nats / math.log(2) / n_bytes

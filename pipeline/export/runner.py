"""Prefill/decode drivers for the exported artifacts, with one interface for all.

Each runner holds a KV cache of ``max_context`` positions and exposes
``logits(tokens, start) -> (S, V)``; :func:`greedy` builds generation on top. A prompt
that would run past the cache is refused before anything executes (the program itself
would write outside its cache).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.model.attention import KVCache
from pipeline.model.decoder import Transformer


class ContextOverflowError(ValueError):
    """A prompt (plus tokens to generate) longer than the program's max context."""


class _Runner:
    max_context: int

    def check_room(self, start: int, length: int) -> None:
        if length < 1:
            raise ValueError("at least one token is needed")
        if start + length > self.max_context:
            raise ContextOverflowError(
                f"{start + length} positions requested, but the program's max context is {self.max_context} "
                f"(prompt of {length} tokens at position {start})"
            )

    def logits(self, tokens: list[int], start: int) -> torch.Tensor:
        """Logits (S, V) of ``tokens`` placed at positions start..start+S-1."""
        self.check_room(start, len(tokens))
        return self._run(torch.tensor([tokens], dtype=torch.long), start)

    def _run(self, tokens_1S: torch.Tensor, start: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class PteRunner(_Runner):
    """The .pte through the ExecuTorch runtime (its own KV cache inside)."""

    def __init__(self, path: Path) -> None:
        from pipeline.export.kernels import open_program

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such ExecuTorch program")
        program = open_program(path)  # with the kernel libraries listed beside it
        self.metadata = {name: int(program.load_method(name).execute([])[0]) for name in CONSTANTS}
        self.max_context = self.metadata["max_context"]
        self._forward = program.load_method("forward")

    def _run(self, tokens_1S, start):
        return self._forward.execute([tokens_1S, torch.tensor([start], dtype=torch.long)])[0][0]


class ProgramRunner(_Runner):
    """A program module called as ``module(tokens_1S, input_pos_1) -> logits (1, S, V)``
    (the eager ExportableLM, or an exported program's module), its cache a buffer."""

    def __init__(self, module: torch.nn.Module, max_context: int) -> None:
        self._module = module
        self.max_context = max_context

    def _run(self, tokens_1S, start):
        with torch.no_grad():
            return self._module(tokens_1S, torch.tensor([start], dtype=torch.long))[0]


class Pt2Runner(ProgramRunner):
    """The .pt2 exported program, run by PyTorch (its cache is a module buffer)."""

    def __init__(self, path: Path, max_context: int) -> None:
        super().__init__(torch.export.load(str(path)).module(), max_context)


class EagerRunner(_Runner):
    """The eager model (converted INT4 or full precision) with the model's own KV cache."""

    def __init__(self, model: Transformer, max_context: int) -> None:
        self.model = model.eval()
        self.max_context = max_context
        self.cache = KVCache(model.cfg, 1, max_context)

    def _run(self, tokens_1S, start):
        with torch.no_grad():
            return self.model(tokens_1S, start_pos=start, cache=self.cache)[0].float()


class HFRunner(_Runner):
    """A transformers causal LM; the whole sequence is recomputed each call (no cache),
    which is what a check of every position needs."""

    def __init__(self, model, max_context: int) -> None:
        self.model = model.eval()
        self.max_context = max_context
        self._seen: list[int] = []

    def _run(self, tokens_1S, start):
        if start > len(self._seen):
            raise ValueError(f"position {start} skips tokens: only {len(self._seen)} seen so far")
        self._seen = self._seen[:start] + tokens_1S[0].tolist()
        with torch.no_grad():
            out = self.model(torch.tensor([self._seen]), use_cache=False).logits[0].float()
        return out[start:]


CONSTANTS = ("max_context", "vocab_size", "bos_id", "eos_id")


def greedy(runner: _Runner, prompt: list[int], new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Prefill ``prompt``, then decode one token per call, greedily (argmax); returns
    the ``new_tokens`` (>= 1) new ids, fewer if ``eos_id`` comes first."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    runner.check_room(0, len(prompt) + new_tokens - 1)
    logits = runner.logits(prompt, 0)
    out: list[int] = []
    pos = len(prompt)
    while True:
        token = int(logits[-1].argmax())
        out.append(token)
        if len(out) >= new_tokens or token == eos_id:
            return out
        logits = runner.logits([token], pos)
        pos += 1

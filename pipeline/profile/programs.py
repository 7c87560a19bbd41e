"""The programs a profile compares: the exported MoE, and models built from a config
with random weights (the dense twins, the paper's shapes) through the same export path.

Speed does not depend on what was learned, so a random-weight model at the right shape
and INT4 format times like a trained one; only routing could differ, and
:mod:`pipeline.profile.routing` measures how evenly the random router spreads tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.export.runner import CONSTANTS
from pipeline.model.config import ModelConfig
from pipeline.model.decoder import Transformer


class ProgramError(ValueError):
    """A program file that is missing, not an ExecuTorch program, or lacks what a runner needs."""


@dataclass
class LoadedProgram:
    """An ExecuTorch program ready to run: ``logits(tokens, start)`` runs ``forward``."""

    path: Path
    metadata: dict[str, int]  # the constant methods (max_context, vocab_size, bos_id, eos_id)
    full_logits: bool  # forward returns every position's logits (else the last only)
    _forward: object

    @property
    def max_context(self) -> int:
        return self.metadata["max_context"]

    def logits(self, tokens: list[int], start: int) -> torch.Tensor:
        """Logits ``(S, V)`` (or ``(1, V)`` for a last-position program); no bounds check
        (the caller checked the longest run against ``max_context`` once)."""
        out = self._forward.execute([torch.tensor([tokens], dtype=torch.long), torch.tensor([start])])
        return out[0][0]


def load_program(path: Path) -> LoadedProgram:
    """Load a .pte and read its metadata; ProgramError names the file and what is wrong."""
    import executorch.kernels.quantized  # noqa: F401 - registers the INT4 embedding lookup's kernel
    from executorch.runtime import Runtime

    path = Path(path)
    if not path.is_file():
        raise ProgramError(f"{path}: no such ExecuTorch program (has the export stage run?)")
    try:
        program = Runtime.get().load_program(str(path))
    except Exception as err:  # noqa: BLE001 - the runtime raises RuntimeError/ValueError for bad bytes
        raise ProgramError(f"{path}: not a loadable ExecuTorch program ({type(err).__name__}: {err})") from None
    missing = [m for m in (*CONSTANTS, "forward") if m not in program.method_names]
    if missing:
        raise ProgramError(f"{path}: the program lacks the method(s) {missing}; re-export it with the export stage")
    metadata = {name: int(program.load_method(name).execute([])[0]) for name in CONSTANTS}
    forward = program.load_method("forward")
    probe = forward.execute([torch.zeros(1, 2, dtype=torch.long), torch.tensor([0])])[0]
    return LoadedProgram(path, metadata, probe.shape[1] == 2, forward)


def random_int4(cfg: ModelConfig, group_size: int, seed: int) -> Transformer:
    """A randomly initialised model of ``cfg`` (the model's own init: a router with
    small random weights, which spreads tokens over experts like a balanced trained
    router) converted to 8da4w by post-training quantization."""
    from pipeline.quant.config import QuantConfig
    from pipeline.quant.convert import post_training_quantize

    torch.manual_seed(seed)
    with torch.no_grad():
        return post_training_quantize(Transformer(cfg).eval(), QuantConfig(group_size=group_size))


def lower_model(model: Transformer, max_context: int, last_logits_only: bool, bos_id: int, eos_id: int) -> bytes:
    """The export stage's path (``ExportableLM`` -> ``torch.export`` -> XNNPACK): .pte bytes."""
    from pipeline.export.lower import export_program, lower_to_pte
    from pipeline.export.program import ExportableLM

    program = ExportableLM(model, max_context, last_logits_only=last_logits_only)
    metadata = {"max_context": max_context, "vocab_size": model.cfg.vocab_size, "bos_id": bos_id, "eos_id": eos_id}
    return lower_to_pte(export_program(program), metadata).buffer

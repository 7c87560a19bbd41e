"""The programs a profile compares: the exported MoE, and models built from a config
with random weights (the dense twins, the paper's shapes) through the same export path.

Speed does not depend on what was learned, so a random-weight model at the right shape
and INT4 format times like a trained one; only routing could differ, and
:mod:`pipeline.profile.routing` measures how evenly the random router spreads tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    from pipeline.export.kernels import MissingKernelsError, open_program

    path = Path(path)
    if not path.is_file():
        raise ProgramError(f"{path}: no such ExecuTorch program (has the export stage run?)")
    try:
        program = open_program(path)
    except MissingKernelsError as err:
        raise ProgramError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - the runtime raises RuntimeError/ValueError for bad bytes
        raise ProgramError(f"{path}: not a loadable ExecuTorch program ({type(err).__name__}: {err})") from None
    missing = [m for m in (*CONSTANTS, "forward") if m not in program.method_names]
    if missing:
        raise ProgramError(f"{path}: the program lacks the method(s) {missing}; re-export it with the export stage")
    try:
        metadata = {name: int(program.load_method(name).execute([])[0]) for name in CONSTANTS}
        forward = program.load_method("forward")
        # A 2-token prefill tells the logits form: (1, 2, V) every position, (1, 1, V) the last.
        probe_1SV = forward.execute(
            [torch.zeros(1, min(2, metadata["max_context"]), dtype=torch.long), torch.tensor([0])]
        )[0]
    except Exception as err:  # noqa: BLE001 - the runtime raises RuntimeError for a wrong signature
        raise ProgramError(
            f"{path}: its methods do not run as forward(tokens[1, S], input_pos[1]) and constant metadata "
            f"({type(err).__name__}: {err})"
        ) from None
    return LoadedProgram(path, metadata, probe_1SV.shape[1] == 2, forward)


def random_int4(
    cfg: ModelConfig, group_size: int, seed: int, balance_on: list[torch.Tensor] | None = None, rate: float = 0.01
) -> tuple[Transformer, list[float]]:
    """A randomly initialised model of ``cfg`` converted to 8da4w by post-training
    quantization, and the history of its routing balance.

    ``balance_on``: token batches ``[B, S]`` of real text. A random router is not
    balanced: the hidden states of text share directions, so a few experts win most
    tokens (max/mean load 3-6 on mobilemoe_s), which would make prefill look cheaper (fewer,
    larger expert GEMMs). Before quantizing, the router's expert bias is trained the way
    pre-training trains it, with the recipe's auxiliary-loss-free sign updates
    (:class:`ExpertBiasBalancer`) at ``rate`` per batch, weights untouched, so load
    spreads like a trained, balanced router's. Returns the max/mean load per batch."""
    from pipeline.quant.config import QuantConfig
    from pipeline.quant.convert import post_training_quantize

    torch.manual_seed(seed)
    model = Transformer(cfg)
    history = balance_router(model, balance_on, rate) if balance_on and cfg.moe is not None else []
    with torch.no_grad():
        return post_training_quantize(model.eval(), QuantConfig(group_size=group_size)), history


@torch.no_grad()
def balance_router(model: Transformer, batches: list[torch.Tensor], rate: float) -> list[float]:
    """Move every router's expert bias by ``rate`` * sign(mean load - load) after each
    batch (forward only); returns the max/mean load, averaged over layers, per batch."""
    from pipeline.model.balance import ExpertBiasBalancer

    balancer = ExpertBiasBalancer(model.moe_layers())
    configs = [router.cfg for router in balancer.routers]
    for router in balancer.routers:
        router.cfg = replace(router.cfg, bias_update_rate=rate)
    model.train()  # routers count tokens in training mode only
    try:
        history = []
        for batch_BS in batches:
            model(batch_BS)
            history.append(balancer.step()["moe/max_over_mean"])
    finally:
        for router, cfg in zip(balancer.routers, configs, strict=True):
            router.cfg = cfg
        model.eval()
    return history


def lower_model(
    model: Transformer, max_context: int, last_logits_only: bool, bos_id: int, eos_id: int, kv_cache: str = "float32"
):
    """The export stage's path (``ExportableLM`` -> ``torch.export`` -> XNNPACK): a
    :class:`pipeline.export.lower.Lowered` (``.write(path)`` writes the .pte and its kernel list)."""
    from pipeline.export.lower import export_program, lower_to_pte
    from pipeline.export.program import ExportableLM

    program = ExportableLM(model, max_context, last_logits_only=last_logits_only, kv_cache=kv_cache)
    metadata = {"max_context": max_context, "vocab_size": model.cfg.vocab_size, "bos_id": bos_id, "eos_id": eos_id}
    return lower_to_pte(export_program(program), metadata)

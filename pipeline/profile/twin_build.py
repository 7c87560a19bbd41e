"""The dense twins' programs for the profile, lowered side by side in processes of their own.

Lowering is ExecuTorch's graph passes in Python: one core's work, 30-35 s for each of the
tiny model's twins on 2 cores, one after the other. Each twin is a function of its config
alone (random weights from a seed, then the export path), so each can be built in a
process of its own: ``python -m pipeline.profile.twin_build SPEC.json`` builds one, and
:func:`build_twins` runs as many at once as there are cores for them and memory for
their lowering peaks (:mod:`pipeline.export.budget`). The programs are the same bytes as
built in one process: the weights come from ``torch.manual_seed`` in the builder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from pipeline.model.config import ModelConfig


@dataclass(frozen=True)
class TwinSpec:
    """One program to build: model ``cfg`` with random INT4 weights (``seed``, groups of
    ``group_size``), lowered as the export stage lowers, written to ``path``."""

    cfg: ModelConfig
    group_size: int
    seed: int
    max_context: int
    last_logits_only: bool
    bos_id: int
    eos_id: int
    kv_cache: str
    path: Path

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "path": str(self.path)})

    @classmethod
    def from_json(cls, text: str) -> TwinSpec:
        from pipeline.configbase import from_dict

        data = json.loads(text)
        return cls(**{**data, "cfg": from_dict(ModelConfig, data["cfg"], "model"), "path": Path(data["path"])})


def build_twin(spec: TwinSpec) -> float:
    """Build and write ``spec``'s program (and its kernel list); returns the seconds taken."""
    from pipeline.profile.programs import lower_model, random_int4

    started = time.perf_counter()
    model = random_int4(spec.cfg, spec.group_size, spec.seed)[0]
    lowered = lower_model(
        model,
        spec.max_context,
        last_logits_only=spec.last_logits_only,
        bos_id=spec.bos_id,
        eos_id=spec.eos_id,
        kv_cache=spec.kv_cache,
    )
    lowered.write(spec.path)
    return time.perf_counter() - started


def concurrency(specs: list[TwinSpec], cores: int, available_bytes: int) -> int:
    """How many of ``specs`` to lower at once: at most ``cores``, and only as many as the
    largest lowering peak (budget.lowering_peak_bytes) fits ``available_bytes``; at least 1."""
    from pipeline.export.budget import lowering_peak_bytes

    if not specs:
        return 1
    peak = max(lowering_peak_bytes(s.cfg, "fused", s.max_context) for s in specs)
    return max(1, min(len(specs), cores, available_bytes // max(peak, 1)))


def build_twins(specs: list[TwinSpec], workers: int) -> list[float]:
    """Every spec's program written to its path, ``workers`` at a time, each in a child
    process (``workers`` 1: in this one); returns each spec's seconds. A child that fails
    raises RuntimeError with its spec's path and the end of its error output."""
    if workers <= 1:
        return [build_twin(spec) for spec in specs]
    # The children import the project as this process does, wherever it runs (a Ray worker).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    # Lowering is single-threaded: a child with torch's default pool would compete for the
    # cores its siblings lower on.
    env["OMP_NUM_THREADS"] = "1"
    seconds: dict[int, float] = {}
    running: list[tuple[int, subprocess.Popen, IO[bytes], IO[bytes]]] = []
    pending = list(enumerate(specs))
    try:
        while pending or running:
            while pending and len(running) < workers:
                i, spec = pending.pop(0)
                # Files, not pipes: a child's warnings must not fill a pipe nobody reads yet.
                out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
                cmd = [sys.executable, "-m", "pipeline.profile.twin_build", spec.to_json()]
                running.append((i, subprocess.Popen(cmd, env=env, stdout=out, stderr=err), out, err))
            i, proc, out, err = running.pop(0)  # in start order: the others run meanwhile
            code = proc.wait()
            out.seek(0), err.seek(0)
            if code != 0:
                tail = err.read().decode(errors="replace")[-3000:]
                out.close(), err.close()
                raise RuntimeError(f"building the program {specs[i].path} failed (exit {code}):\n{tail}")
            seconds[i] = json.loads(out.read().decode().strip().splitlines()[-1])["seconds"]
            out.close(), err.close()
    finally:
        for _, proc, out, err in running:  # after a failure or an interrupt: none left behind
            proc.kill()
            proc.wait()
            out.close(), err.close()
    return [seconds[i] for i in range(len(specs))]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipeline.profile.twin_build SPEC_JSON", file=sys.stderr)
        return 2
    print(json.dumps({"seconds": build_twin(TwinSpec.from_json(args[0]))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

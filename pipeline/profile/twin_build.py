"""The dense twins' programs for the profile, lowered side by side in processes of their own.

Lowering is ExecuTorch's graph passes in Python: one core's work, 30-35 s for each of the
tiny model's twins on 2 cores, one after the other. Each twin is a function of its config
alone (random weights from a seed, then the export path), so each can be built in a
process of its own: ``python -m pipeline.profile.twin_build SPEC_JSON`` builds one, and
:func:`build_twins` runs as many at once as the profile's threads and the memory for
their lowering peaks allow (:mod:`pipeline.export.budget`). A child builds the same bytes
as the profile's own process (tests/profile/test_profile.py): the weights come from
``torch.manual_seed``, and neither the initialisation nor the quantization depends on
the number of threads (element-wise maths and exact reductions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from pipeline.model.config import ModelConfig

POLL_S = 0.2  # how often the parent looks at its children (a failure is reported within this)


@dataclass(frozen=True)
class TwinSpec:
    """One program to build: model ``cfg`` with random INT4 weights (``torch.manual_seed
    (seed)``, groups of ``group_size`` weights), lowered as the export stage lowers with a
    KV cache of ``max_context`` positions in dtype ``kv_cache`` (a name, e.g. "float32"),
    returning the last position's logits only when ``last_logits_only``, with token ids
    ``bos_id``/``eos_id`` as constant methods; written to ``path`` (a .pte, and its kernel
    list beside it)."""

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


def build_twin(spec: TwinSpec) -> None:
    """Build and write ``spec``'s program (and its kernel list) in this process."""
    from pipeline.profile.programs import lower_model, random_int4

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


def concurrency(specs: list[TwinSpec], threads: int, available_bytes: int) -> int:
    """How many of ``specs`` to lower at once: at most ``threads`` (``stage.profile.threads``,
    the CPUs the profile holds), and as many as the largest lowering peak
    (budget.lowering_peak_bytes; twins are dense, so the MoE form is moot) fits into
    ``available_bytes``; at least 1."""
    from pipeline.export.budget import lowering_peak_bytes

    if not specs:
        return 1
    peak = max(lowering_peak_bytes(s.cfg, "fused", s.max_context) for s in specs)
    return max(1, min(len(specs), threads, available_bytes // max(peak, 1)))


def build_twins(specs: list[TwinSpec], workers: int) -> dict[Path, float]:
    """Every spec's program written to its path, ``workers`` at a time, each in a child
    process (``workers`` 1: one after another in this process); returns the seconds each
    took, by path (a child's include its interpreter's start and imports, 3-5 s).

    Errors: in this process, the builder's own exception; from a child, RuntimeError
    naming the spec's path, its exit code and the end of its error output, after the
    other children are stopped. An interrupt (Ctrl-C, a cancelled Ray task) stops and
    reaps every child before it propagates."""
    if workers <= 1:
        seconds = {}
        for spec in specs:
            started = time.perf_counter()
            build_twin(spec)
            seconds[spec.path] = time.perf_counter() - started
        return seconds
    # The children import the project as this process does, wherever it runs (a Ray
    # worker): its import path, the directories only. One thread each: lowering is one
    # core's work, and a child with torch's default pool would compete with its siblings.
    path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    seconds: dict[Path, float] = {}
    running: list[tuple[TwinSpec, subprocess.Popen, IO[bytes], float]] = []
    pending = list(specs)
    try:
        while pending or running:
            while pending and len(running) < workers:
                spec = pending.pop(0)
                # A file, not a pipe: a child's warnings must not fill a pipe nobody reads yet.
                err = tempfile.TemporaryFile()
                cmd = [sys.executable, "-m", "pipeline.profile.twin_build", spec.to_json()]
                proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
                running.append((spec, proc, err, time.perf_counter()))
            done = [entry for entry in running if entry[1].poll() is not None]
            if not done:
                time.sleep(POLL_S)
                continue
            for entry in done:
                spec, proc, err, started = entry
                running.remove(entry)
                err.seek(0)
                tail = err.read().decode(errors="replace")[-3000:]
                err.close()
                if proc.returncode != 0:
                    raise RuntimeError(f"building the program {spec.path} failed (exit {proc.returncode}):\n{tail}")
                seconds[spec.path] = time.perf_counter() - started
    finally:
        for _, proc, err, _ in running:  # after a failure or an interrupt: none left behind
            proc.kill()
            proc.wait()
            err.close()
    return seconds


def _exit_with_parent() -> None:
    """End this child if its parent dies (a Ray worker killed outright cannot stop it)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipeline.profile.twin_build SPEC_JSON", file=sys.stderr)
        return 2
    _exit_with_parent()
    build_twin(TwinSpec.from_json(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

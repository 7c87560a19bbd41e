"""The recipe's fixed costs: the micro ``make repro`` with the stage server and without.

Each run is a fresh scratch copy of this repository on the micro preset (tools/drill.py's
``scratch_copy``, this venv), its own MLflow store and Ray directory; runs alternate
between the stage server on and off (``MOBILEMOE_NO_STAGE_SERVER``,
pipeline/runner/stage_server.py), so a slow spell of the machine falls on both. At the
micro preset a stage's own work is seconds, so the recipe is mostly fixed cost. Prints,
per run, the wall time of ``make repro``, the recipe's MLflow run, the time inside the
stages' own MLflow runs and the rest (between them: DVC, process starts, imports); then
the medians per setting and their ratio. Not a test: ``make bench-repro`` (about 4
minutes a run on 2 cores; ``--pairs N``).
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline.runner.stage_client import OFF_ENV
from tools.drill import env_for, scratch_copy


def one_run(dest: Path, server: bool) -> dict[str, float]:
    """A micro ``make repro`` in a fresh scratch copy at ``dest``: its seconds."""
    ray_dir = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")  # Unix socket paths stay short
    try:
        env = env_for(dest, ray_dir)
        scratch_copy(dest, env, "micro")
        if not server:
            env[OFF_ENV] = "1"
        started = time.perf_counter()
        with (dest / "repro.log").open("w") as log:
            proc = subprocess.run(["make", "repro"], cwd=dest, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"make repro failed ({proc.returncode}); see {dest / 'repro.log'}")
    with sqlite3.connect(dest / "mlflow.db") as db:
        runs = db.execute("select name, start_time, end_time from runs").fetchall()
    (recipe,) = [(end - start) / 1000 for name, start, end in runs if name == "recipe"]
    stages = sum((end - start) / 1000 for name, start, end in runs if name != "recipe")
    return {"wall": wall, "recipe": recipe, "stages": stages, "between": recipe - stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="runs per setting, alternating (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-repro-"))
    seen: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    try:
        for i in range(args.pairs):
            for server in (True, False) if i % 2 == 0 else (False, True):
                run = one_run(root / f"{i}-{'on' if server else 'off'}", server)
                seen[server].append(run)
                said = " ".join(f"{k} {v:.1f} s" for k, v in run.items())
                print(f"stage server {'on ' if server else 'off'}: {said}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    medians = {s: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for s, runs in seen.items()}
    for key in ("wall", "between"):
        on, off = medians[True][key], medians[False][key]
        print(f"median {key}: on {on:.1f} s, off {off:.1f} s, on / off {on / off:.2f}")


if __name__ == "__main__":
    main()

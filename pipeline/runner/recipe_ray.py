"""One Ray for a whole recipe: ``python -m pipeline.runner.recipe_ray --params params.yaml CMD ...``.

Starts the embedded Ray in this process (loopback only, sized to this machine, as a
stage would), runs ``CMD`` with ``MOBILEMOE_RECIPE_RAY`` set to its address so that
every stage ``CMD`` runs joins it instead of starting and stopping a Ray of its own, and
stops it when ``CMD`` ends, fails or is interrupted. ``make repro`` wraps ``dvc repro``
in it (through :mod:`pipeline.runner.repro`). Ctrl-C and SIGTERM are passed to ``CMD``'s
whole process group (DVC and the stage it runs) and waited for before Ray stops, so no
stage loses its Ray mid-work. When the params file's ``ray.address`` (or ``RAY_ADDRESS``)
names a cluster, ``CMD`` runs as it is; a stage run by hand (the variable unset) starts
its own Ray, as before.
Exit code: ``CMD``'s, 128 + N when a signal N ended it, 2 for a bad params file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.train.config import RayConfig


def _ray_config(params: Path) -> RayConfig:
    """The params file's ``ray`` section, validated (ConfigError naming the key)."""
    from pipeline.configbase import from_dict
    from pipeline.recipe import load_params
    from pipeline.train.config import RayConfig

    return from_dict(RayConfig, load_params(params).get("ray") or {}, "ray")


def exit_code(returncode: int) -> int:
    """A child's return code as a shell reports it: 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


def run_in_ray(ray_cfg: RayConfig, command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` (its own process group, ``env`` added to ours) inside one embedded
    Ray that every stage it starts joins; stop Ray when it ends. On a cluster, or inside
    a recipe's Ray already, ``command`` runs as it is. Returns :func:`exit_code`."""
    from pipeline.runner import cluster

    child_env = {**os.environ, **(env or {})}
    if cluster.on_cluster(ray_cfg) or os.environ.get(cluster.RECIPE_RAY_ENV):
        return exit_code(subprocess.call(list(command), env=child_env))
    import ray

    cluster.start(ray_cfg)
    child_env[cluster.RECIPE_RAY_ENV] = ray.get_runtime_context().gcs_address
    # Its own process group: a signal reaches DVC and the stage it runs together.
    child = subprocess.Popen(list(command), env=child_env, process_group=0)

    def forward(signum, frame):  # noqa: ARG001 - the handler's signature
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:  # already gone
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return exit_code(child.wait())
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        ray.shutdown()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] != "--params":
        print(__doc__, file=sys.stderr)
        return 2
    from pipeline.configbase import ConfigError

    params, command = Path(argv[1]), argv[2:]
    try:
        ray_cfg = _ray_config(params)
    except ConfigError as err:
        print(f"recipe_ray: {params}: {err}", file=sys.stderr)
        return 2
    return run_in_ray(ray_cfg, command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""One Ray for a whole recipe: ``python -m pipeline.runner.recipe_ray --params params.yaml CMD ...``.

Starts the embedded Ray in this process (loopback only, sized to this machine, as a
stage would), runs ``CMD`` with ``MOBILEMOE_RECIPE_RAY`` set to its address so that
every stage ``CMD`` runs joins it instead of starting and stopping a Ray of its own, and
stops it when ``CMD`` ends, fails or is interrupted. ``make repro`` wraps ``dvc repro``
in it. Ctrl-C and SIGTERM are passed to ``CMD``'s whole process group (DVC and the stage
it runs) and waited for before Ray stops, so no stage loses its Ray mid-work. When the
params file's ``ray.address`` (or ``RAY_ADDRESS``) names a cluster, ``CMD`` runs as it
is; a stage run by hand (the variable unset) starts its own Ray, as before.
Exit code: ``CMD``'s, 128 + N when a signal N ended it, 2 for a bad params file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def _ray_config(params: Path):
    """The params file's ``ray`` section, validated (ConfigError naming the key)."""
    from pipeline.configbase import from_dict
    from pipeline.recipe import load_params
    from pipeline.train.config import RayConfig

    return from_dict(RayConfig, load_params(params).get("ray") or {}, "ray")


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # -N: killed by signal N


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] != "--params":
        print(__doc__, file=sys.stderr)
        return 2
    from pipeline.configbase import ConfigError
    from pipeline.runner import cluster

    params, command = Path(argv[1]), argv[2:]
    try:
        ray_cfg = _ray_config(params)
    except ConfigError as err:
        print(f"recipe_ray: {params}: {err}", file=sys.stderr)
        return 2
    if cluster.on_cluster(ray_cfg) or os.environ.get(cluster.RECIPE_RAY_ENV):
        return _exit_code(subprocess.call(command))  # a cluster, or already inside a recipe's Ray
    import ray

    cluster.start(ray_cfg)
    env = {**os.environ, cluster.RECIPE_RAY_ENV: ray.get_runtime_context().gcs_address}
    # Its own process group: a signal reaches DVC and the stage it runs together.
    child = subprocess.Popen(command, env=env, process_group=0)

    def forward(signum, frame):  # noqa: ARG001 - the handler's signature
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:  # already gone
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _exit_code(child.wait())
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        ray.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

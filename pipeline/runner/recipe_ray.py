"""One Ray for a whole recipe: ``python -m pipeline.runner.recipe_ray CMD ...``.

Starts the embedded Ray in this process (loopback only, sized to this machine, as a
stage would), runs ``CMD`` with ``MOBILEMOE_RECIPE_RAY`` set to its address so that
every stage ``CMD`` runs joins it instead of starting and stopping a Ray of its own, and
stops it when ``CMD`` ends, fails or is interrupted (Ctrl-C, SIGTERM). ``make repro``
wraps ``dvc repro`` in it. A stage run by hand (the variable unset) starts its own Ray,
as before; with ``RAY_ADDRESS`` naming a cluster the command runs as it is.
Exit code: ``CMD``'s (130 after Ctrl-C).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    from pipeline.runner import cluster
    from pipeline.train.config import RayConfig

    if cluster.on_cluster(RayConfig()) or os.environ.get(cluster.RECIPE_RAY_ENV):
        return subprocess.call(argv)  # a cluster, or already inside a recipe's Ray
    import ray

    cluster.start(RayConfig())
    env = {**os.environ, cluster.RECIPE_RAY_ENV: ray.get_runtime_context().gcs_address}
    child = subprocess.Popen(argv, env=env)

    def forward(signum, frame):  # noqa: ARG001 - the signal handler's signature
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # the terminal sent SIGINT to the child as well
                child.wait()
                return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        ray.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

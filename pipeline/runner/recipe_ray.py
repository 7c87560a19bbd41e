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
from typing import TYPE_CHECKING, NamedTuple

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


class Outcome(NamedTuple):
    """How a command ended: its :func:`exit_code`, and whether it was interrupted (a
    SIGINT or SIGTERM passed on to it, or a signal ended it) rather than failing alone."""

    code: int
    interrupted: bool


def run_forwarding_signals(command: Sequence[str], env: Mapping[str, str]) -> Outcome:
    """Run ``command`` in its own process group and wait for it; SIGINT and SIGTERM sent
    to this process go to that whole group (DVC and the stage it runs) instead."""
    forwarded: list[int] = []
    children: list[subprocess.Popen] = []

    def forward(signum, frame):  # noqa: ARG001 - the handler's signature
        forwarded.append(signum)
        for child in children:
            try:
                os.killpg(child.pid, signum)
            except ProcessLookupError:  # already gone
                pass

    # Handlers first: a signal that comes while the command starts is passed on too.
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        children.append(subprocess.Popen(list(command), env=dict(env), process_group=0))
        if forwarded:
            forward(forwarded[-1], None)
        returncode = children[0].wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return Outcome(exit_code(returncode), bool(forwarded) or returncode < 0)


def run_in_ray(ray_cfg: RayConfig, command: Sequence[str], env: Mapping[str, str] | None = None) -> Outcome:
    """Run ``command`` (``env`` added to ours; signals passed on, see
    :func:`run_forwarding_signals`) inside one embedded Ray that every stage it starts
    joins, and stop Ray when it ends. On a cluster, or inside a recipe's Ray already,
    ``command`` runs without starting one. Beside it runs the recipe's stage server
    (:mod:`pipeline.runner.stage_server`, started and stopped with Ray by
    :func:`pipeline.runner.stage_client.running`), except inside a recipe's Ray already."""
    from pipeline.runner import cluster, stage_client

    child_env = {**os.environ, **(env or {})}
    if os.environ.get(cluster.RECIPE_RAY_ENV):  # inside a recipe's Ray (and its stage server) already
        return run_forwarding_signals(command, child_env)
    # The stage server's imports run while Ray starts and the first stage begins.
    with stage_client.running(child_env, enabled=not os.environ.get(stage_client.OFF_ENV)) as server_env:
        child_env.update(server_env)
        if cluster.on_cluster(ray_cfg):
            return run_forwarding_signals(command, child_env)
        import ray

        cluster.start(ray_cfg)
        try:
            child_env[cluster.RECIPE_RAY_ENV] = ray.get_runtime_context().gcs_address
            return run_forwarding_signals(command, child_env)
        finally:
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
    return run_in_ray(ray_cfg, command).code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

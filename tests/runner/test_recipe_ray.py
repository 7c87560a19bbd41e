"""One Ray for a whole recipe: every stage joins it, and it stops with the recipe."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.recipe import REPO_ROOT
from tools.drill import env_for

# What a stage does first: start (or join) Ray; then it says where it is.
STAGE = """
import os, ray
from pipeline.runner import cluster
from pipeline.train.config import RayConfig
cluster.start(RayConfig())
print(ray.get_runtime_context().gcs_address, os.environ.get(cluster.RECIPE_RAY_ENV), ray.cluster_resources()["device"])
"""


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, int(port))) == 0


@pytest.mark.slow
def test_every_stage_of_a_recipe_joins_one_ray_that_stops_with_it():
    ray_dir = tempfile.mkdtemp(prefix="ray-recipe-", dir="/tmp")  # Unix socket paths stay short
    try:
        env = env_for(REPO_ROOT, ray_dir)
        stages = f"{sys.executable} -c '{STAGE}' && {sys.executable} -c '{STAGE}' && exit 3"
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.runner.recipe_ray", "sh", "-c", stages],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 3, proc.stderr[-3000:]  # the command's own exit code
        lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("127.0.0.1:")]
        assert len(lines) == 2, proc.stdout
        (first, recipe, device), (second, _, _) = lines
        # Both stages joined the recipe's Ray (the one embedded Ray, with the device resource) ...
        assert first == second == recipe and float(device) == 1.0
        assert first.startswith("127.0.0.1:")
        # ... which stopped with the command.
        assert not _listening(first)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_without_a_command_it_says_how_to_use_it():
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.runner.recipe_ray"], cwd=Path(REPO_ROOT), capture_output=True, text=True
    )
    assert proc.returncode == 2 and "python -m pipeline.runner.recipe_ray CMD" in proc.stderr

"""``python -m pipeline.runner.preflight params.yaml``: the whole file, validated.

``make repro`` and ``make <stage>`` run this check (:mod:`pipeline.runner.repro`)
before DVC touches anything: a bad value
or an unknown key anywhere in params.yaml (even one no stage reads, which DVC would
otherwise ignore without a word) stops the recipe here, naming the key, with every
earlier output as it was. So does a cluster (``ray.address`` / ``RAY_ADDRESS``) with a
run storage or a tracking store that only this machine sees.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.configbase import ConfigError
from pipeline.recipe import RecipeConfig, load_params, validate
from pipeline.runner.cluster import check_cluster_config


def check_params(path: str | Path) -> RecipeConfig:
    """The params file at ``path``, validated whole; ConfigError names the bad key."""
    recipe = validate(load_params(path))
    check_cluster_config(recipe.ray, recipe.tracking)
    return recipe


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m pipeline.runner.preflight PARAMS.yaml", file=sys.stderr)
        return 2
    try:
        check_params(args[0])
    except ConfigError as err:
        print(f"{args[0]}: config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

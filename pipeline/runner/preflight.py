"""``python -m pipeline.runner.preflight params.yaml``: the whole file, validated.

``make repro`` and ``make <stage>`` run this check (:mod:`pipeline.runner.repro`)
before DVC touches anything: a bad value
or an unknown key anywhere in params.yaml (even one no stage reads, which DVC would
otherwise ignore without a word) stops the recipe here, naming the key, with every
earlier output as it was. So does a cluster (``ray.address`` / ``RAY_ADDRESS``) with a
run storage or a tracking store that only this machine sees. So does a QAT study
scheme (``stage.qat.scheme`` other than the exported 8da4w) when the whole recipe is
asked for: the export would refuse it after QAT's training (:func:`check_whole_recipe`).
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


def check_whole_recipe(recipe: RecipeConfig) -> None:
    """What only the whole recipe needs, checked before DVC: the export lowers the
    deployed scheme alone, so a study scheme (8da3w, 8da2w) runs as ``make qat-study``
    (the qat stage by hand, into its own directory), not through the export. Raises ConfigError naming the key."""
    from pipeline.quant.config import DEPLOYED_SCHEME

    scheme = recipe.stage.qat.scheme
    if scheme != DEPLOYED_SCHEME:
        raise ConfigError(
            f"stage.qat.scheme: {scheme} is a QAT study scheme and the recipe's export lowers "
            f"{DEPLOYED_SCHEME} only; run the study beside the recipe with `make qat-study SCHEME={scheme}`, "
            f"or set stage.qat.scheme={DEPLOYED_SCHEME}"
        )


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

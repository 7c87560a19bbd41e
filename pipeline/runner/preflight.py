"""``python -m pipeline.runner.preflight params.yaml``: the whole file, validated.

``make repro`` and ``make <stage>`` run this check (:mod:`pipeline.runner.repro`)
before DVC touches anything: a bad value
or an unknown key anywhere in params.yaml (even one no stage reads, which DVC would
otherwise ignore without a word) stops the recipe here, naming the key, with every
earlier output as it was. So does a cluster (``ray.address`` / ``RAY_ADDRESS``) with a
run storage or a tracking store that only this machine sees. So does a QAT study
scheme (``stage.qat.scheme`` other than the exported 8da4w) when the stages asked for
reach the export, which would refuse it after QAT's training (:func:`check_export_scheme`).
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


def check_export_scheme(recipe: RecipeConfig, stages: Sequence[str] = (), repo: Path | None = None) -> None:
    """The export lowers the deployed scheme alone: with a study scheme (8da3w, 8da2w)
    in ``stage.qat.scheme``, refuse the whole recipe (``stages`` empty) and any target
    whose upstream holds the export stage (DVC's own graph of ``repo``, the current
    directory by default), before DVC trains QAT only for the export to refuse it. The
    study runs as ``make qat-study`` (the qat stage by hand, into its own directory).
    Raises ConfigError naming the key and the stage that would fail."""
    from pipeline.quant.config import DEPLOYED_SCHEME

    scheme = recipe.stage.qat.scheme
    if scheme == DEPLOYED_SCHEME:
        return
    reaching = [] if stages else ["every stage"]
    if stages:
        import networkx as nx
        from dvc.repo import Repo

        with Repo(str(repo or Path.cwd())) as dvc_repo:
            graph = dvc_repo.index.graph
            by_name = {node.addressing: node for node in graph.nodes}
            for name in stages:
                node = by_name.get(name)
                upstream = {n.addressing for n in nx.descendants(graph, node)} if node is not None else set()
                if name == "export" or "export" in upstream:
                    reaching.append(name)
    if reaching:
        raise ConfigError(
            f"stage.qat.scheme: {scheme} is a QAT study scheme and the recipe's export lowers "
            f"{DEPLOYED_SCHEME} only ({', '.join(reaching)} would reach it); run the study beside the "
            f"recipe with `make qat-study SCHEME={scheme}`, or set stage.qat.scheme={DEPLOYED_SCHEME}"
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

"""The mix stage from the driver's side: validate, build on Ray, track.

The build runs as one Ray task, so on a cluster it lands on a worker like every other
stage; ``build_all`` writes into a scratch sibling and swaps it into ``data.out_dir``
only when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.data.build import build_all, validate_all
from pipeline.data.document import DataError
from pipeline.data.mixing import MixtureConfig
from pipeline.data.sources import iter_documents
from pipeline.recipe import RecipeConfig, repo_path

MIXTURES = ("pretrain", "midtrain", "sft")


def run_mix_stage(recipe: RecipeConfig, raw: dict, sweep_dir: Path | None) -> dict:
    import ray

    from pipeline import tracking
    from pipeline.train.ray_job import init_ray

    mixtures = {name: getattr(recipe.data, name) for name in MIXTURES}
    validate_all(mixtures, recipe.model.vocab_size)  # before Ray starts
    preflight_sources(mixtures)
    out_dir = (sweep_dir / "mix") if sweep_dir else repo_path(recipe.data.out_dir)
    params = {"data": raw["data"], "model": {"vocab_size": raw["model"]["vocab_size"]}}
    with tracking.stage_run(recipe.tracking, "mix", params=params) as run:
        init_ray(recipe.ray)
        build = ray.remote(num_cpus=1)(build_all)
        metrics = ray.get(build.remote(mixtures["pretrain"], mixtures["midtrain"], mixtures["sft"],
                                       recipe.model.vocab_size, out_dir))
        for name in MIXTURES:
            manifest = json.loads((out_dir / name / "manifest.json").read_text())
            run.log_dataset(manifest, name=f"{name}-mixture", context=name)
            run.log_artifact(out_dir / name / "manifest.json", f"manifests/{name}")
        run.log_artifact(out_dir / "tokenizer", "tokenizer")
        run.log_artifact(out_dir / "metrics.json")
        run.log_metrics(_flat_numbers(metrics))
    return metrics


def preflight_sources(mixtures: dict[str, MixtureConfig]) -> None:
    """Read the first document of every required source, so an empty one fails in
    seconds, naming the source, before Ray starts and before anything is rebuilt."""
    for role, cfg in mixtures.items():
        for i, src in enumerate(cfg.sources):
            if src.weight <= 0 or src.optional:
                continue
            where = f"data.{role}.sources[{i}] ({src.name!r}, kind {src.kind})"
            try:
                first = next((d for d in iter_documents(src) if d.text.strip()), None)
            except DataError as err:
                raise DataError(f"{where}: {err}") from None
            if first is None:
                raise DataError(f"{where} yielded no documents")


def _flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_numbers(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out

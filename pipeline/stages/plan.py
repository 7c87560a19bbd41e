"""``make plan``: the planner on the fitted law, as a command.

    python -m pipeline.stages plan --memory 3GB --flops 2GFLOP [--name planned] [overrides ...]
    python -m pipeline.stages plan --memory 1.5GB --decode-speed 40 --bandwidth 60GB/s

Reads the law from ``outputs/scaling/fit.json`` (``make scaling-fit``) and the search
space from ``scaling.plan`` in ``conf/scaling.yaml`` (Hydra overrides after the flags,
e.g. ``scaling.plan.space.n_layers=[2,4]``). Prints the best architectures within the
budgets, the best per expansion (where the sparsity sweet spot lies), and where the
reference models (the paper's MobileMoE-S/M/L, MobileLLM-Pro, and the dense twins of
the first MoE) sit against the frontier. Writes the chosen architecture as
``conf/model/<name>.yaml`` (which ``python -m pipeline.stages pretrain model=<name>`` trains as
it is) and ``outputs/scaling/plan/<name>/``: plan.json, plan.md and the frontier plots.
Exit code 2 with one line for a bad budget, a missing fit, or a budget nothing fits.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

from pipeline.configbase import ConfigError, from_dict
from pipeline.model.config import ModelConfig
from pipeline.model.twins import dense_twin
from pipeline.recipe import CONF_DIR, REPO_ROOT, repo_path, validate
from pipeline.scaling.config import ScalingStageConfig
from pipeline.scaling.plan_report import load_law, outside_sweep, plan_header, write_plan
from pipeline.scaling.planner import (
    Budget,
    PlanError,
    evaluate,
    model_yaml,
    parse_bandwidth,
    parse_bytes,
    parse_flops,
    parse_rate,
    plan,
)

FIT_FILE = "outputs/scaling/fit.json"
OUT_ROOT = "outputs/scaling/plan"
# The first line of every config the planner writes: it only ever overwrites its own.
MARKER = "Written by the architecture planner (make plan)"
EXIT_BAD_INPUT = 2


def compose_scaling(overrides: list[str]) -> dict:
    """``conf/scaling.yaml`` composed with Hydra overrides, as a plain dict."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="scaling", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def load_model(name: str, conf_dir: Path = CONF_DIR) -> ModelConfig:
    """``conf/model/<name>.yaml`` as a validated ModelConfig (ConfigError if absent)."""
    import yaml

    path = conf_dir / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"scaling.plan: no model config {path}")
    return from_dict(ModelConfig, yaml.safe_load(path.read_text()), f"model {name}")


def budget_from_args(args: argparse.Namespace) -> Budget:
    """The budgets of the command line (PlanError naming the flag for a bad value)."""
    decode_bytes = None
    if (args.decode_speed is None) != (args.bandwidth is None):
        raise PlanError("--decode-speed and --bandwidth go together (bytes per step = bandwidth / speed)")
    if args.decode_speed is not None:
        bandwidth = parse_bandwidth(args.bandwidth, "--bandwidth")
        decode_bytes = bandwidth / parse_rate(args.decode_speed, "--decode-speed")
    return Budget(
        memory_bytes=parse_bytes(args.memory, "--memory") if args.memory else None,
        flops_per_token=parse_flops(args.flops, "--flops") if args.flops else None,
        decode_bytes=decode_bytes,
    )


def references(cfg: ScalingStageConfig, conf_dir: Path = CONF_DIR) -> list[ModelConfig]:
    """The reference models, plus the dense twins (active, total) of the first MoE
    unless the list names them already (``tiny``'s twins have configs of their own)."""
    models = [load_model(name, conf_dir) for name in cfg.plan.references]
    first_moe = next((m for m in models if m.moe is not None), None)
    if first_moe is not None:
        names = {m.name for m in models}
        twins = [dense_twin(first_moe, match, cfg.plan.group_size) for match in ("active", "total")]
        models += [t for t in twins if t.name not in names]
    return models


def write_config(model: ModelConfig, path: Path, header: str) -> None:
    """Write ``model`` to ``path``; refuse to overwrite a config the planner did not write."""
    if path.exists() and not path.read_text().startswith(f"# {MARKER}"):
        raise PlanError(f"--name: {path} exists and was not written by the planner; choose another --name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(model_yaml(model, f"{MARKER}\n{header}"))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stages plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", help="INT4 weight budget, e.g. 3GB (SI) or 3GiB")
    parser.add_argument("--flops", help="decode FLOPs per token at scaling.plan.context, e.g. 2e9 or 2GFLOP")
    parser.add_argument("--decode-speed", help="target decode tokens/s (with --bandwidth)")
    parser.add_argument("--bandwidth", help="memory read bandwidth, e.g. 60GB/s (with --decode-speed)")
    parser.add_argument("--name", default="planned", help="the config to write: conf/model/<name>.yaml")
    parser.add_argument("--fit", default=FIT_FILE, help="the fitted law (make scaling-fit)")
    parser.add_argument("--conf-dir", default=str(CONF_DIR), help="where model/<name>.yaml is written")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/scaling.yaml")
    args = parser.parse_args(argv)
    try:
        return _plan(args)
    except (PlanError, ConfigError) as err:
        print(f"plan: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _plan(args: argparse.Namespace) -> int:
    budget = budget_from_args(args)  # a unit typo fails here, before anything is read
    if not args.name.replace("_", "").isalnum():
        raise PlanError(f"--name {args.name!r}: use letters, digits and underscores")
    raw = compose_scaling(list(args.overrides))
    cfg = from_dict(ScalingStageConfig, raw.get("scaling") or {}, "scaling")
    law, fit = load_law(repo_path(args.fit))
    base = load_model(cfg.plan.base)
    embedding_bits = 8 if cfg.plan.embedding == "int8" else 4
    result = plan(
        law,
        budget,
        cfg.plan.space,
        base,
        cfg.plan.tokens,
        cfg.plan.context,
        cfg.plan.group_size,
        cfg.plan.top,
        embedding_bits,
        admit=outside_sweep(fit) if cfg.plan.within_sweep else None,
    )
    model = replace(result.chosen.model, name=args.name)
    recipe = {k: v for k, v in raw.items() if k not in ("sweep", "scaling")}
    validate({**recipe, "model": asdict(model)})  # the recipe trains it as it is
    refs = evaluate(references(cfg), law, cfg.plan.tokens, cfg.plan.context, cfg.plan.group_size, embedding_bits)
    header = plan_header(result, budget, fit, cfg.plan.tokens, cfg.plan.context)
    config_path = Path(args.conf_dir) / "model" / f"{args.name}.yaml"
    write_config(model, config_path, header)  # first: it refuses a config the planner did not write
    out = repo_path(OUT_ROOT) / args.name
    out.mkdir(parents=True, exist_ok=True)
    text = write_plan(out, args.name, result, refs, budget, header, fit, cfg.plan.tokens, config_path)
    print(text)
    print(f"\nwrote {config_path} and {out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out}/")
    return 0

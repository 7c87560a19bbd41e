"""``python -m pipeline.stages closed_loop``: the law's prediction for the architecture it
chose, against the run that trained it (``make closed-loop``; the maths is
pipeline/scaling/closed_loop.py).

Reads the newest FINISHED point of ``--sweep`` (default ``closed_loop``, a one-point
sweep of the planner's choice; with its seed replicates when it has several, e.g. after
``make closed-loop ARGS="seed=0,1,2"``) from the MLflow store of ``--params``: the point
``--point`` names, else the one a one-point ``conf/sweep/<sweep>.yaml`` names now (the
store keeps the runs of earlier choices under the same sweep), else its only one; and ``--fit``
(``make scaling-fit``'s ``fit.json``, with its bootstrap refits); writes
``<name>.json`` and ``<name>.md`` into ``--out`` (``--name``, by default the sweep's:
``closed_loop.json`` for the loop, ``closed_loop_in_range.json`` for a control). With
``--runs-from`` a loop file written before, the runs are the ones it names (no MLflow):
the same runs held against a refitted law, written under that file's name unless
``--name`` says otherwise. Exit 2 with one line when either is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline import tracking
    from pipeline.configbase import ConfigError
    from pipeline.recipe import load_params, validate
    from pipeline.scaling.closed_loop import compare, compare_replicates, report, saved_runs
    from pipeline.scaling.fit import ScalingFitError
    from pipeline.stages.scaling import observations
    from pipeline.stages.sweep import STAGE, point_base

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--sweep", default="closed_loop")
    parser.add_argument("--fit", type=Path, default=Path("outputs/scaling/fit.json"))
    parser.add_argument("--out", type=Path, default=Path("outputs/scaling"))
    parser.add_argument("--name", help="the files' stem in --out (default: the --sweep's name)")
    parser.add_argument(
        "--point",
        help="which point of the sweep, with its seeds, e.g. l6-e14k6s2-600000, or one seed's run (-seed1); "
        "default: the one conf/sweep/<sweep>.yaml names, else its only one",
    )
    parser.add_argument(
        "--runs-from",
        type=Path,
        help="a loop file written before (e.g. outputs/scaling/closed_loop.json): hold its runs against --fit "
        "instead of reading them from MLflow (after a refit from the points table, where the store is gone)",
    )
    args = parser.parse_args(argv)
    try:
        fit = json.loads(args.fit.read_text())
        if "intervals" not in fit or "thetas" not in fit["intervals"]:
            raise ConfigError(f"--fit {args.fit}: no bootstrap refits in it; run `make scaling-fit` again")
        saved = json.loads(args.runs_from.read_text()) if args.runs_from else None
        source = f"--runs-from {args.runs_from}" if saved is not None else f"sweep {args.sweep} in MLflow"
        said = "--point"
        if saved is not None:
            points = saved_runs(saved)
        else:
            cfg = validate(load_params(args.params)).tracking
            runs = tracking.tagged_runs(cfg, {"stage": STAGE, "sweep": args.sweep})
            points = observations(runs, hold_out_sizes=[])
            named = args.point or conf_point(args.sweep)
            said = "--point" if args.point else f"conf/sweep/{args.sweep}.yaml's point"
            args.point = named
        if args.point:
            seed_run = point_base(args.point) != args.point  # -seed<n>: that run alone; else with its seeds
            chosen = [p for p in points if (p.name if seed_run else point_base(p.name)) == args.point]
            if not chosen:
                names = ", ".join(p.name for p in points) or "none"
                raise ConfigError(f"{said} {args.point}: not a finished point of {source} ({names})")
            points = chosen
        bases = {point_base(p.name) for p in points}
        if len(bases) != 1:
            found = "no FINISHED point" if not points else f"{len(points)} points ({', '.join(p.name for p in points)})"
            raise ConfigError(f"{source}: {found}; name one with --point")
        base = bases.pop()
        result = compare(fit, points[0]) if len(points) == 1 else compare_replicates(fit, points, base)
        if saved is not None and len(points) > 1 and result["train_seconds"] is None:
            result["train_seconds"] = saved.get("train_seconds")  # an older file kept only the runs' mean
    except (OSError, ValueError, ConfigError, ScalingFitError, tracking.TrackingError) as err:
        print(f"closed_loop: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or (args.runs_from.stem if args.runs_from else args.sweep)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    text = report(result, fit)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0


def conf_point(sweep: str) -> str | None:
    """The point a one-point loop sweep ``conf/sweep/<sweep>.yaml`` names
    (``<size>-<arch>-<tokens>``); None without that file or for a grid of several sizes or
    architectures (its ``size``/``arch`` are only the job's defaults). ConfigError for a
    one-point file without ``sweep.size``, ``arch``, ``tokens``."""
    import yaml

    from pipeline.configbase import ConfigError
    from pipeline.recipe import repo_path
    from pipeline.stages.sweep import point_name

    path = repo_path("conf/sweep") / f"{sweep}.yaml"
    if not path.is_file():
        return None
    try:
        spec = (yaml.safe_load(path.read_text()) or {}).get("sweep") or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not YAML: {err}") from None
    if len(spec.get("sizes") or []) != 1 or len(spec.get("archs") or []) != 1:
        return None
    if not all(k in spec for k in ("size", "arch", "tokens")):
        raise ConfigError(f"{path}: no sweep.size, sweep.arch and sweep.tokens: not a one-point loop sweep")
    return point_name(spec["size"], spec["arch"], spec["tokens"], 0)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pipeline.tracking start|end|url``: a parent run from the shell (``make sweep``).

``start [--params params.yaml] [--name N] [--tag k=v ...] [--owner-pid PID]`` prints only
the new parent run's id (so ``ID=$(python -m pipeline.tracking start)`` works), or nothing
when the params file disables tracking; the store and experiment are the params file's
``tracking`` section (the stages use the same). ``PID`` is the process whose death means
the run's work was killed (make's shell). ``make repro`` opens its parent in-process
(:mod:`pipeline.runner.repro`). ``end ID [--params ...] [--status S]`` closes it.
``url --ui http://127.0.0.1:5000 [--params ...]`` prints the address of the recipe's
runs in the MLflow UI (``make ui``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.configbase import ConfigError, from_dict
from pipeline.tracking.config import DEFAULT_EXPERIMENT, TrackingConfig, TrackingError, check_store
from pipeline.tracking.lifecycle import end_recipe_run, start_recipe_run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking")
    sub = parser.add_subparsers(dest="cmd", required=True)
    start = sub.add_parser("start", help="create the recipe's parent run and print its id")
    start.add_argument("--params", type=Path, default=None, help="read tracking.* from this params file")
    start.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    start.add_argument("--name", default="recipe")
    start.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    start.add_argument("--owner-pid", type=int, default=None)
    end = sub.add_parser("end", help="mark a parent run finished/failed")
    end.add_argument("run_id")
    end.add_argument("--params", type=Path, default=None, help="read tracking.* from this params file")
    end.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    end.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    url = sub.add_parser("url", help="print the address of the recipe's runs in the MLflow UI")
    url.add_argument("--ui", required=True, help="the UI's address, e.g. http://127.0.0.1:5000")
    url.add_argument("--params", type=Path, default=None, help="read tracking.* from this params file")
    url.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    args = parser.parse_args(argv)
    try:
        cfg = _config(args.params, args.experiment)
    except ConfigError as err:
        print(f"tracking: {args.params}: {err}", file=sys.stderr)
        return 2
    if not cfg.enabled:
        return 0  # nothing to open or close; the stages do not track either
    if args.cmd == "url":
        from pipeline.tracking.queries import runs_page

        try:
            page = runs_page(cfg, args.ui)
        except TrackingError as err:
            print(f"tracking: {err}", file=sys.stderr)
            return 2
        print(page or f"{args.ui} (no runs of experiment {cfg.experiment!r} yet: run `make repro`)")
        return 0
    if args.cmd == "start":
        bad = [t for t in args.tag if "=" not in t]
        if bad:
            parser.error(f"--tag expects KEY=VALUE, got {bad[0]!r}")
        tags = dict(t.split("=", 1) for t in args.tag)
        owner = None
        if args.owner_pid is not None:
            from pipeline.process import ProcessId

            owner = ProcessId.of(args.owner_pid)
        try:
            check_store(cfg)
            run_id = start_recipe_run(cfg, tags, name=args.name, owner=owner)
        except TrackingError as err:
            print(f"tracking: {err}", file=sys.stderr)
            return 2
        print(run_id)
    else:
        end_recipe_run(args.run_id, args.status, cfg)
    return 0


def _config(params: Path | None, experiment: str) -> TrackingConfig:
    if params is None:
        return TrackingConfig(experiment=experiment)
    import yaml

    try:
        section = (yaml.safe_load(params.read_text()) or {}).get("tracking") or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {params}: {err}") from None
    return from_dict(TrackingConfig, section, "tracking")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

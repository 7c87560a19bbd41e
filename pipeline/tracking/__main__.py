"""``python -m pipeline.tracking start|end``: the recipe's parent run, for ``make repro``.

``start [--experiment E] [--name N] [--tag k=v ...] [--owner-pid PID]`` prints only the
new parent run's id (so ``ID=$(python -m pipeline.tracking start)`` works); ``PID`` is
the process whose death means the recipe was killed (make's shell). ``end ID [--status S]``
closes it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.tracking.config import DEFAULT_EXPERIMENT, TrackingConfig, TrackingError, check_store
from pipeline.tracking.runs import end_recipe_run, start_recipe_run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking")
    sub = parser.add_subparsers(dest="cmd", required=True)
    start = sub.add_parser("start", help="create the recipe's parent run and print its id")
    start.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    start.add_argument("--name", default="recipe")
    start.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    start.add_argument("--owner-pid", type=int, default=None)
    end = sub.add_parser("end", help="mark a parent run finished/failed")
    end.add_argument("run_id")
    end.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    end.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    args = parser.parse_args(argv)
    cfg = TrackingConfig(experiment=args.experiment)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

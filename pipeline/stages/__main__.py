"""``python -m pipeline.stages NAME [--params params.yaml | overrides ... [-m]]``: run a stage.

NAME is any declared stage (``list`` prints them in recipe order), or one of the tools
beside the recipe: ``sweep`` (a Hydra multirun of sweep points over ``conf/scaling.yaml``),
``scaling_fit``, ``plan`` (the planner's own flags, see ``plan --help``) and
``closed_loop`` (the law's prediction for the planner's choice against its run).
``python -m pipeline.stages dvc [-o dvc.yaml]`` writes dvc.yaml from the declarations (and,
with ``-o``, the Makefile's ``STAGES`` line: one ``make <stage>`` target per stage).
"""

from __future__ import annotations

import os
import sys

from pipeline.runner import stage_client
from pipeline.runner.stage_client import SERVER_ENV


def _sweep() -> None:
    from pipeline.runner.cli import stage_main
    from pipeline.stages.sweep import SWEEP_POINT, point_config

    stage_main(SWEEP_POINT, config_name="scaling", prepare=point_config)


def _scaling_fit() -> None:
    from pipeline.runner.cli import stage_main
    from pipeline.stages.scaling import SCALING_FIT, prepare_fit

    stage_main(SCALING_FIT, config_name="scaling", prepare=prepare_fit)


def _plan() -> None:
    from pipeline.stages.plan import main

    sys.exit(main())


def _closed_loop() -> None:
    from pipeline.stages.closed_loop import main

    sys.exit(main())


def _dvc() -> None:
    import argparse
    from pathlib import Path

    from pipeline.stages import dvcfile, registry

    parser = argparse.ArgumentParser(prog="python -m pipeline.stages dvc")
    parser.add_argument("-o", "--output", help="write here (dvc.yaml) instead of stdout")
    parser.add_argument("--makefile", default="Makefile", help="whose STAGES line to update with -o")
    args = parser.parse_args()
    stages = registry.recipe_stages()
    text = dvcfile.render(stages)
    if args.output:
        Path(args.output).write_text(text)
        dvcfile.sync_makefile(Path(args.makefile), stages)  # `make <stage>` for every stage
    else:
        sys.stdout.write(text)


def _serve() -> None:
    """``serve SOCKET OWNER_PID``: the recipe's warm stage server (started by
    pipeline.runner.recipe_ray); its forked children run the stages DVC asks for."""
    from pipeline.runner import stage_server
    from pipeline.stages import registry

    if len(sys.argv) != 3 or not sys.argv[2].isdigit():
        sys.exit("usage: python -m pipeline.stages serve SOCKET OWNER_PID")
    if stage_server.serve(sys.argv[1], int(sys.argv[2]), warm=registry.all_stages):
        main()  # a forked child, with the client's argv


def _list() -> None:
    from pipeline.stages import registry

    print("\n".join(stage.name for stage in registry.recipe_stages()))


TOOLS = {
    "sweep": _sweep,
    "scaling_fit": _scaling_fit,
    "plan": _plan,
    "closed_loop": _closed_loop,
    "dvc": _dvc,
    "list": _list,
    "serve": _serve,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    address = os.environ.get(SERVER_ENV)
    if address and sys.argv[1] not in TOOLS:  # inside `make repro`: the recipe's warm stage server
        code = stage_client.request(address, sys.argv)
        if code is not None:
            sys.exit(code)
    name = sys.argv.pop(1)
    sys.argv[0] = f"python -m pipeline.stages {name}"  # what usage lines and Hydra show
    if name in TOOLS:
        TOOLS[name]()
        return

    from pipeline.runner.cli import stage_main
    from pipeline.stages import registry

    try:
        stage = registry.get(name)
    except KeyError as err:
        print(f"python -m pipeline.stages: {err.args[0]}; or one of: {', '.join(TOOLS)}", file=sys.stderr)
        sys.exit(2)
    stage_main(stage)


if __name__ == "__main__":
    main()

"""How a stage gets its config: from params.yaml under DVC, or from Hydra by hand.

``python -m pipeline.stages X --params params.yaml`` reads the composed file that ``dvc
repro`` tracks (``dvc exp run -S key=value`` rewrites it through DVC's Hydra composition).
``python -m pipeline.stages X [key=value ...] [-m]`` composes ``conf/`` with Hydra overrides;
with ``-m`` every sweep point is its own run with its own output directory.
Either way the runner validates the whole config before the stage does any work, and a
bad input ends the process with one line naming it (exit code 2), not a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.configbase import ConfigError
from pipeline.recipe import CONF_DIR, load_params
from pipeline.runner.spec import Stage

EXIT_BAD_INPUT = 2

# (composed config, Hydra's multirun job directory or None) -> the same, for the stage
Prepare = Callable[[dict, "Path | None"], tuple[dict, "Path | None"]]


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "bad input or environment", raised before any work: one line,
    no traceback. (The runner turns a bad data file or checkpoint into a StageInputError
    naming its config key; the same errors during the work are failures with a traceback.)"""
    from pipeline.runner.errors import StageError
    from pipeline.tracking import TrackingError

    return ConfigError, StageError, TrackingError


def _run(stage: Stage, raw: dict, sweep_dir: Path | None, prepare: Prepare | None = None) -> None:
    from pipeline.runner.run import run_stage

    try:
        if prepare is not None:
            raw, sweep_dir = prepare(raw, sweep_dir)
        run_stage(stage, raw, sweep_dir)
    except _input_errors() as err:
        print(f"stage {stage.name}: {type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def stage_main(stage: Stage, config_name: str = "config", prepare: Prepare | None = None) -> None:
    """Run ``stage`` with the config its command line names (``python -m pipeline.stages``).

    ``config_name``: the primary config in ``conf/``; ``prepare(raw, sweep_dir)`` turns
    the composed config into the stage's (e.g. a scaling sweep point's model) and may
    raise ConfigError, reported like any bad config."""
    argv = sys.argv[1:]
    if argv[:1] == ["--params"]:
        if len(argv) != 2:
            sys.exit(f"usage: {sys.argv[0]} --params PARAMS.yaml")
        try:
            raw = load_params(argv[1])
        except ConfigError as err:
            print(f"stage {stage.name}: config error: {err}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        _run(stage, raw, None, prepare)
        return

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def _hydra_entry(cfg) -> None:
        from pipeline.recipe import to_container

        hc = HydraConfig.get()
        sweep_dir = Path(hc.runtime.output_dir) if hc.mode == RunMode.MULTIRUN else None
        _run(stage, to_container(cfg), sweep_dir, prepare)

    _hydra_entry()

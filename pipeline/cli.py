"""How a stage script gets its config: from params.yaml under DVC, or from Hydra by hand.

``python stages/X.py --params params.yaml`` reads the composed file that ``dvc repro``
tracks (``dvc exp run -S key=value`` rewrites it through DVC's Hydra composition).
``python stages/X.py [key=value ...] [-m]`` composes ``conf/`` with Hydra overrides;
with ``-m`` every sweep point is its own run with its own output directory.
Either way the whole config is validated before the stage does any work.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from pipeline.configbase import ConfigError
from pipeline.recipe import CONF_DIR, RecipeConfig, load_params, validate

StageFn = Callable[[RecipeConfig, dict, Path | None], None]


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "bad input": reported in one line, without a traceback."""
    from pipeline.data.document import DataError
    from pipeline.train.checkpoint import CheckpointError
    from pipeline.train.stage import StageInputError

    return ConfigError, DataError, CheckpointError, StageInputError


def _run(stage: str, fn: StageFn, raw: dict, sweep_dir: Path | None) -> None:
    recipe = _validated(stage, raw)
    try:
        fn(recipe, raw, sweep_dir)
    except _input_errors() as err:
        sys.exit(f"stage {stage}: {type(err).__name__}: {err}")


def stage_main(stage: str, fn: StageFn) -> None:
    """Run ``fn(recipe, raw_config, sweep_dir)``; ``sweep_dir`` is set for multirun points."""
    argv = sys.argv[1:]
    if argv[:1] == ["--params"]:
        if len(argv) != 2:
            sys.exit(f"usage: python stages/{stage}.py --params PARAMS.yaml")
        try:
            raw = load_params(argv[1])
        except ConfigError as err:
            sys.exit(f"stage {stage}: config error: {err}")
        _run(stage, fn, raw, None)
        return

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def _hydra_entry(cfg) -> None:
        from pipeline.recipe import to_container

        raw = to_container(cfg)
        hc = HydraConfig.get()
        sweep_dir = Path(hc.runtime.output_dir) if hc.mode == RunMode.MULTIRUN else None
        _run(stage, fn, raw, sweep_dir)

    _hydra_entry()


def _validated(stage: str, raw: dict) -> RecipeConfig:
    try:
        return validate(raw)
    except ConfigError as err:
        sys.exit(f"stage {stage}: config error: {err}")

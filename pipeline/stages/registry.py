"""The recipe's stages, found where they are declared.

Every module of :mod:`pipeline.stages` lists the recipe's stages it declares in a
module-level ``STAGES`` tuple, each with its ``dvc`` place. ``dvc.yaml``, the Makefile's
stage targets and the report's order all follow from this list, so adding a stage is
adding a module (docs/adding-a-stage.md). The work beside the recipe (a sweep point,
the scaling fit, the planner) has its own entries in ``python -m pipeline.stages``.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from pipeline.runner.spec import Stage

# Modules of the package that declare no stages (the tooling around them).
_TOOLING = frozenset({"registry", "dvcfile", "__main__"})


@cache
def all_stages() -> dict[str, Stage]:
    """Every declared stage by name. Raises ValueError when two modules declare the same
    name, or two recipe stages the same place (the order would be ambiguous)."""
    import pipeline.stages as package

    found: dict[str, Stage] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in _TOOLING or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for stage in getattr(module, "STAGES", ()):
            if not isinstance(stage, Stage):
                raise ValueError(f"{module.__name__}.STAGES holds {stage!r}, not a Stage")
            if stage.name in found:
                raise ValueError(f"stage {stage.name!r} is declared twice (again in {module.__name__})")
            found[stage.name] = stage
    from pipeline.stages.__main__ import TOOLS

    shadowed = sorted(set(found) & set(TOOLS))
    if shadowed:  # `python -m pipeline.stages NAME` would run the tool, never the stage
        raise ValueError(f"stage {shadowed[0]!r} has the name of a command of python -m pipeline.stages")
    places: dict[int, str] = {}
    for stage in found.values():
        if stage.dvc is not None:
            other = places.setdefault(stage.dvc.order, stage.name)
            if other != stage.name:
                raise ValueError(f"stages {other!r} and {stage.name!r} both declare order {stage.dvc.order}")
    return found


def recipe_stages() -> list[Stage]:
    """The recipe's stages (those with a place in dvc.yaml), in recipe order."""
    return sorted((s for s in all_stages().values() if s.dvc is not None), key=lambda s: s.dvc.order)


def get(name: str) -> Stage:
    """The stage called ``name``; KeyError listing the known names otherwise."""
    stages = all_stages()
    if name not in stages:
        raise KeyError(f"no stage {name!r}; the stages are: {', '.join(stages)}")
    return stages[name]

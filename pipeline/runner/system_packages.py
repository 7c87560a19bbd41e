"""The Debian packages the data sources read, and which of them this machine lacks.

A source kind whose data comes from a system package names it (``Kind.debian``: WordNet's
``wordnet-base``). The default recipe lists such a source as *optional*: the mix stage
skips it when its files are absent, so a machine without the package builds another
mixture, and every model, metric and ``dvc.lock`` hash after it differs from the
committed ones. Two things keep that from happening unseen:

- ``make system-packages`` (run by ``make setup`` and ``make repro``, not by ``make
  test``, which needs none) runs ``python -m pipeline.runner.system_packages --install``
  for the sources of the recipe in params.yaml (the micro preset reads none): a missing
  package is installed with apt-get when this process is root and apt-get is on
  PATH (``apt-get update`` and a second try when the first finds no package lists);
  otherwise it says what to run, or that this machine has no apt-get. It never fails:
  a machine without Debian still runs the recipe, without those sources.
- ``make repro`` prints :func:`skipped_sources`' warnings before DVC runs.

Here, not in ``pipeline/data``: that folder is a code dependency of the mix and training
stages, and how a machine is set up changes none of their results.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipeline.data.base import DataError
from pipeline.data.sources import KINDS, check_available, kind_of

if TYPE_CHECKING:  # `make system-packages` runs on every `make repro`: no more imports than it needs
    from pipeline.data.mixing import MixtureConfig
    from pipeline.recipe import DataConfig


def missing_packages(kind_names: Iterable[str] | None = None) -> dict[str, str]:
    """``{Debian package: why}`` for every kind (all by default) that reads a system
    package and cannot read it at its default options; ``why`` is the kind's own check
    message (which file is absent)."""
    missing: dict[str, str] = {}
    for name in kind_names if kind_names is not None else KINDS:
        kind = KINDS[name]
        if kind.debian is None:
            continue
        try:
            kind.check(kind.resolve({}))
        except DataError as err:
            missing.setdefault(kind.debian, f"source kind {name!r}: {err}")
    return missing


def install_commands(packages: Sequence[str]) -> tuple[list[str], list[str]]:
    """The apt-get command lines that install ``packages`` (no prompt, no recommends):
    the package lists' update, and the install."""
    return ["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *packages]


def advice(packages: Sequence[str]) -> str:
    """What to run by hand, on this machine: the apt-get commands, or that there is none."""
    if shutil.which("apt-get") is None:
        return (
            "this machine has no apt-get: point the source's options.path at a copy of Debian's files "
            f"({', '.join(packages)}) to build the committed mixture"
        )
    update, install = install_commands(packages)
    return f"install with: sudo {' '.join(update)} && sudo {' '.join(install)}"


def mixtures(data: DataConfig) -> dict[str, MixtureConfig]:
    """``data``'s mixtures by field name (pretrain, midtrain, sft)."""
    from pipeline.data.mixing import MixtureConfig

    named = {field.name: getattr(data, field.name) for field in dataclasses.fields(data)}
    return {name: value for name, value in named.items() if isinstance(value, MixtureConfig)}


def recipe_kinds(params: Path) -> list[str]:
    """The source kinds the recipe in ``params`` reads: its mixtures' sources of positive
    weight (what ``MixtureConfig.active_sources`` keeps; a source's weight defaults to 1),
    read from the YAML without validating the recipe, which ``make repro``'s preflight
    does next: validation's imports would make this step, run on every ``make repro``,
    0.7 s instead of 0.1 s. Raises ValueError when the file holds no ``data.<mixture>.
    sources[].kind``, OSError when it cannot be read, yaml.YAMLError when it is not YAML."""
    raw = yaml.safe_load(Path(params).read_text())
    try:
        mixtures = [m for m in raw["data"].values() if isinstance(m, dict) and "sources" in m]
        kinds = {src["kind"] for m in mixtures for src in m["sources"] if float(src.get("weight", 1.0)) > 0}
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"no data.<mixture>.sources[].kind to read ({type(err).__name__}: {err})") from None
    if not mixtures:
        raise ValueError("no mixture under data")
    return sorted(kinds)


def skipped_sources(data: DataConfig) -> list[str]:
    """One warning per optional source of ``data``'s mixtures (its ``MixtureConfig``
    fields) whose data is absent here: if the mix stage runs here it
    skips the source, so the mixture and every result after it differ from a machine that
    has it. A non-optional source is the mix stage's input check to refuse, not a warning."""
    warnings: dict[str, str] = {}
    for role, mixture in mixtures(data).items():
        for src in mixture.active_sources:
            if not src.optional or src.name in warnings:
                continue
            try:
                check_available(src)
            except DataError as err:
                package = kind_of(src.kind).debian
                fix = f"; `make system-packages` as root installs {package}" if package else ""
                warnings[src.name] = (
                    f"data.{role}: optional {err}. If the mix stage runs here it skips the source, and the "
                    f"mixture and every result after it differ from a machine that has it{fix}"
                )
    return list(warnings.values())


def install(packages: Sequence[str]) -> bool:
    """Install ``packages`` with apt-get when root and apt-get is on PATH: the install,
    and after a failure (an image without package lists) ``apt-get update`` and the
    install once more. True when the last install succeeded; False, having run nothing,
    when it cannot run here."""
    if not packages:
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    update, install_cmd = install_commands(packages)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install_cmd, env=env).returncode == 0:
        return True
    return subprocess.run(update, env=env).returncode == 0 and subprocess.run(install_cmd, env=env).returncode == 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.runner.system_packages", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--install", action="store_true", help="apt-get install what is missing (as root)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the recipe whose sources count")
    args = parser.parse_args(argv)
    try:
        kinds = recipe_kinds(args.params)
    except (ValueError, OSError, yaml.YAMLError) as err:  # the recipe's preflight names it next, and stops
        print(f"system packages: not checked: {args.params}: {err}", file=sys.stderr)
        return 0
    missing = missing_packages(kinds)
    if not missing:
        return 0
    packages = sorted(missing)
    for package, why in missing.items():
        print(f"Debian package {package!r} is absent ({why})", file=sys.stderr)
    if args.install and install(packages) and not missing_packages(kinds):
        print(f"installed {', '.join(packages)}", file=sys.stderr)
        return 0
    print(
        f"warning: without {', '.join(packages)} the recipe skips the optional sources that read them, and its "
        f"mixture and results differ from a machine that has them (the committed dvc.lock's); {advice(packages)}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

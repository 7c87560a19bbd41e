"""The Debian packages the data sources read, and which of them this machine lacks.

A source kind whose data comes from a system package names it (``Kind.debian``: WordNet's
``wordnet-base``). The default recipe lists such a source as *optional*: the mixer skips
it when its files are absent, so a machine without the package builds another mixture,
and every model, metric and ``dvc.lock`` hash after it differs from the committed ones.
Two things keep that from happening silently:

- ``make setup`` runs ``python -m pipeline.data.system --install``: each missing package
  is installed with ``apt-get`` when this process is root and apt-get is on PATH;
  otherwise it prints the command to run. It never fails the set-up (a machine without
  Debian can still run the recipe, without those sources).
- ``make repro`` prints :func:`skipped_sources`' warnings before DVC runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence

from pipeline.data.base import DataError


def missing_packages(kind_names: Iterable[str] | None = None) -> dict[str, str]:
    """``{Debian package: why}`` for every kind (all by default) that reads a system
    package and cannot read it at its default options; ``why`` is the kind's own check
    message (which file is absent)."""
    from pipeline.data.sources import KINDS

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


def install_command(packages: Sequence[str]) -> list[str]:
    """The apt-get command line that installs ``packages`` (no prompt, no recommends)."""
    return ["apt-get", "install", "-y", "--no-install-recommends", *packages]


def skipped_sources(mixtures: dict) -> list[str]:
    """One warning per optional source of ``mixtures`` ({role: MixtureConfig}) whose data
    is absent here: the mixer would skip it, so the mixture (and all after it) would
    differ from a machine that has it. Non-optional sources are the mix stage's to refuse."""
    from pipeline.data.sources import check_available, kind_of

    warnings: dict[str, str] = {}
    for role, mixture in mixtures.items():
        for src in mixture.active_sources:
            if not src.optional or src.name in warnings:
                continue
            try:
                check_available(src)
            except DataError as err:
                debian = kind_of(src.kind).debian
                fix = f"; `make setup` as root installs it ({' '.join(install_command([debian]))})" if debian else ""
                warnings[src.name] = (
                    f"data.{role}: optional {err}. The mix will skip it, so the mixture and every result after it "
                    f"will differ from a machine that has it{fix}"
                )
    return list(warnings.values())


def install(packages: Sequence[str]) -> int:
    """Run :func:`install_command` for ``packages`` when root and apt-get is on PATH;
    returns its exit code, or 1 without running anything when it cannot run."""
    if not packages:
        return 0
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return 1
    return subprocess.run(install_command(packages)).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.system", description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="apt-get install what is missing (as root)")
    args = parser.parse_args(argv)
    missing = missing_packages()
    if not missing:
        return 0
    for package, why in missing.items():
        print(f"Debian package {package!r} is absent ({why})", file=sys.stderr)
    if args.install and install(sorted(missing)) == 0 and not missing_packages():
        print(f"installed {', '.join(sorted(missing))}", file=sys.stderr)
        return 0
    print(
        f"warning: without {', '.join(sorted(missing))} the default recipe skips the optional sources that read "
        f"them, and its mixture and results differ from the committed dvc.lock; install with: "
        f"sudo {' '.join(install_command(sorted(missing)))}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

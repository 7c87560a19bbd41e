"""``make mutants``: mutation testing of the core maths, with a kill rate and its survivors.

Runs mutmut (configured in pyproject.toml's ``[tool.mutmut]``) in a scratch copy of the
repository, so the working tree is never touched, then prints the kill rate and every
surviving mutant, each marked as explained (listed in ``tests/equivalent_mutants.txt``
with a reason) or not. ``--without tests/test_x.py ...`` runs the same mutants against
the suite minus those files: the "before" of a before/after comparison.

A killed mutant is one a test failed on; a mutant that made a test hang past mutmut's
timeout counts as killed too (the test did not pass). The kill rate is killed / (killed +
survived + reached by no test): a mutant no test reaches is as alive as a survivor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tools.scratch import REPO_ROOT, copy_repo

EQUIVALENT = REPO_ROOT / "tests" / "equivalent_mutants.txt"


def scratch_copy(dest: Path, without: list[str]) -> Path:
    copy_repo(dest, leave_out=without)
    if without:
        pyproject = dest / "pyproject.toml"
        text = pyproject.read_text()
        for rel in without:
            text = re.sub(rf'\n\s*"{re.escape(rel)}",', "", text)
        pyproject.write_text(text)
    return dest


def explained() -> dict[str, str]:
    """Mutant name -> why it is equivalent (one per line: ``name  reason``)."""
    if not EQUIVALENT.is_file():
        return {}
    out = {}
    for line in EQUIVALENT.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.strip().partition(" ")
            out[name] = reason.strip()
    return out


def run(copy: Path, max_children: int, names: list[str] = ()) -> dict:
    # One intra-op thread per mutant process: the children already run side by side, and
    # a forked process must not inherit a running thread pool.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    mutmut = str(REPO_ROOT / ".venv" / "bin" / "mutmut")
    subprocess.run(
        [mutmut, "run", "--max-children", str(max_children), *names],
        cwd=copy,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run([mutmut, "export-cicd-stats"], cwd=copy, env=env, check=True, capture_output=True)
    stats = json.loads((copy / "mutants" / "mutmut-cicd-stats.json").read_text())
    listing = subprocess.run(
        [mutmut, "results", "--all", "true"], cwd=copy, env=env, check=True, capture_output=True, text=True
    ).stdout
    status = dict(line.strip().rsplit(": ", 1) for line in listing.splitlines() if ": " in line)
    if names:  # only these were run: the rest keep the earlier run's verdicts
        status = {name: status.get(name, "not checked") for name in names}
    return {"stats": stats, "status": status}


def report(result: dict, label: str) -> float:
    """Print the kill rate (killed / every mutant that was run or had no test) and every
    mutant that was not killed: survived (a test ran and passed) or reached by no test."""
    status = result["status"]
    count = {s: sum(1 for v in status.values() if v == s) for s in ("killed", "timeout", "survived", "no tests")}
    killed = count["killed"] + count["timeout"]
    alive = sorted(name for name, s in status.items() if s in ("survived", "no tests"))
    rate = killed / max(killed + len(alive), 1)
    print(
        f"{label}: {len(status)} mutants; killed {killed} (of which {count['timeout']} by timeout), "
        f"survived {count['survived']}, reached by no test {count['no tests']}: kill rate {rate:.1%}"
    )
    reasons = explained()
    for name in alive:
        print(f"  {status[name]}: {name}: {reasons.get(name, 'UNEXPLAINED')}")
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.mutants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--without", nargs="*", default=[], help="test files left out (the 'before' suite)")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (mutmut browse works there)")
    parser.add_argument("--json", type=Path, help="also write the statuses here")
    parser.add_argument(
        "--rerun",
        type=Path,
        metavar="JSON",
        help="re-run only the mutants a previous --json run left alive, against today's tests; report the "
        "same mutant set with their new verdicts",
    )
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="mobilemoe-mutants-"))
    try:
        copy = scratch_copy(scratch / "repo", args.without)
        label = "without " + ", ".join(args.without) if args.without else "full unit suite"
        if args.rerun:
            earlier = json.loads(args.rerun.read_text())
            alive = [name for name, s in earlier["status"].items() if s in ("survived", "no tests")]
            again = run(copy, args.max_children, alive)
            result = {"stats": again["stats"], "status": {**earlier["status"], **again["status"]}}
            label += f" (the {len(alive)} alive in {args.rerun.name}, re-run)"
        else:
            result = run(copy, args.max_children)
        report(result, label)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, sort_keys=True))
    finally:
        if args.keep:
            print(f"kept {scratch / 'repo'}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m pipeline.runner.repro --params params.yaml [STAGE ...] [-- DVC_FLAGS ...]``.

What ``make repro`` and ``make <stage>`` run, in one process:

1. validate the whole params file (a bad value or an unknown key anywhere stops here,
   naming the key, before DVC touches anything; :mod:`pipeline.runner.preflight`);
2. ask DVC whether anything is to run (``dvc status``, with the stages' upstream when
   STAGEs are named; started before step 1 and read after it, so the two overlap, and
   stopped when step 1 fails); when nothing is, say so and stop: no Ray, no MLflow run
   (a no-op costs about as much as ``dvc status`` itself). Skipped when DVC_FLAGS are
   given (``-f`` must run);
   when something is, warn about each optional data source this machine lacks (a mix
   run here would skip it: :func:`pipeline.runner.system_packages.skipped_sources`);
3. open the recipe's MLflow parent run, owned by this process (if it dies, the next
   run that opens an MLflow run closes the parent as KILLED; a no-op opens none);
4. run ``dvc repro [DVC_FLAGS] [STAGE ...]`` inside one embedded Ray that every stage
   joins (:func:`pipeline.runner.recipe_ray.run_in_ray`), Ctrl-C and SIGTERM passed on;
5. close the parent run: FINISHED, FAILED, or KILLED when DVC was interrupted
   (:func:`parent_status`).

Exit code: DVC's (128 + N after signal N), 2 for a bad params file or an unreachable
tracking store.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.configbase import ConfigError
from pipeline.runner.recipe_ray import Outcome, run_in_ray


def dvc_executable() -> str:
    """The ``dvc`` beside this interpreter (the project's venv), else the one on PATH."""
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else "dvc"


def start_status(stages: Sequence[str]) -> subprocess.Popen:
    """``dvc status`` for ``stages`` (all when empty) and their upstream, started; its
    exit code is 0 when nothing is to run. Any other answer (changes, or an error DVC
    will report again when ``dvc repro`` runs) counts as not up to date; its output is
    dropped, so a params file the validation then refuses gets one message, not two."""
    cmd = [dvc_executable(), "status", "--quiet", *(["--with-deps", *stages] if stages else [])]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_status(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    """Stop a ``dvc status`` that is no longer needed, and reap it. SIGINT first: DVC
    holds read locks in ``.dvc/tmp/rwlock`` while it works and releases them when
    interrupted, where a SIGKILL would leave them for the next ``dvc repro`` to clean up
    (with a warning). SIGKILL only if it has not ended after ``grace_s`` seconds."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def parent_status(outcome: Outcome) -> str:
    """The parent run's end: FINISHED when DVC succeeded, KILLED when it was interrupted,
    FAILED otherwise. DVC reports a failed stage with codes of its own (255, ...), so the
    code alone cannot tell a kill from a failure."""
    if outcome.interrupted:
        return "KILLED"
    return "FINISHED" if outcome.code == 0 else "FAILED"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dvc_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m pipeline.runner.repro", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, required=True)
    parser.add_argument("stages", nargs="*", help="run these and what they need upstream (default: every stage)")
    args = parser.parse_args(argv)
    # DVC's answer takes longer than the validation (mostly its own start-up): ask first.
    status = None if dvc_flags else start_status(args.stages)
    try:
        from pipeline.runner.preflight import check_export_scheme, check_params

        recipe = check_params(args.params)
        check_export_scheme(recipe, args.stages)
    except ConfigError as err:
        stop_status(status)
        print(f"{args.params}: config error: {err}", file=sys.stderr)
        return 2
    except BaseException:  # Ctrl-C, or a bug: DVC's answer is moot
        stop_status(status)
        raise
    if status is not None and status.wait() == 0:
        print(f"{' '.join(args.stages) or 'every stage'}: up to date (dvc status); nothing to run")
        return 0
    from pipeline.runner.system_packages import skipped_sources

    # Said before DVC runs: the mix itself only logs a skipped source and notes it in its manifest.
    for warning in skipped_sources(recipe.data):
        print(f"warning: {warning}", file=sys.stderr)

    from pipeline import tracking

    name = "recipe" + "".join(f":{s}" for s in args.stages)
    env = {}
    if recipe.tracking.enabled:
        try:
            tracking.check_store(recipe.tracking)
            env[tracking.PARENT_ENV] = tracking.start_recipe_run(recipe.tracking, name=name)
        except tracking.TrackingError as err:
            print(f"tracking: {err}", file=sys.stderr)
            return 2
    outcome, status = None, "FAILED"  # an error before DVC ran (Ray would not start, say)
    try:
        outcome = run_in_ray(recipe.ray, [dvc_executable(), "repro", *dvc_flags, *args.stages], env)
        status = parent_status(outcome)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracking.PARENT_ENV in env:
            try:
                tracking.end_recipe_run(env[tracking.PARENT_ENV], status, recipe.tracking)
            except Exception as err:  # noqa: BLE001 - the recipe's result stands; a later run closes it
                print(f"tracking: could not close the recipe run: {type(err).__name__}: {err}", file=sys.stderr)
    return outcome.code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

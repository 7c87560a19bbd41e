"""How long config validation takes, beside the Hydra composition it follows.

The recipe promises that a bad config fails "in well under a second", before Ray starts. The
test suite only checks *that* a bad config is named (timings in tests flake on a busy
machine); this benchmark prints how fast it is, as the ratio of validating to composing
measured side by side in one run. Not a test: run `make bench-config`.
"""

from __future__ import annotations

import statistics
import time

from pipeline.configbase import ConfigError
from pipeline.recipe import compose, validate


def median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(reps: int = 15) -> None:
    good = compose()
    bad = compose(["model.moe.top_k=32"])

    def validate_bad() -> None:
        try:
            validate(bad)
        except ConfigError:
            return
        raise AssertionError("the bad config validated")

    compose_s = median_seconds(compose, reps)
    good_s = median_seconds(lambda: validate(good), reps)
    bad_s = median_seconds(validate_bad, reps)
    print(f"compose conf/ (Hydra)        {compose_s * 1e3:8.2f} ms")
    print(f"validate (good config)       {good_s * 1e3:8.2f} ms   {good_s / compose_s:6.3f}x compose")
    print(f"validate (bad key, rejected) {bad_s * 1e3:8.2f} ms   {bad_s / compose_s:6.3f}x compose")


if __name__ == "__main__":
    main()

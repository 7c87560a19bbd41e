"""Stage `evalsets`: the evaluation suite, built from the held-out band of the recipe's sources."""

from pipeline.runner.cli import stage_main
from pipeline.stages.eval import EVALSETS

if __name__ == "__main__":
    stage_main(EVALSETS)

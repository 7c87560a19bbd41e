"""Stage `midtrain`: continue pre-training's final model on the knowledge/code/math-heavy mixture."""

from pipeline.runner.cli import stage_main
from pipeline.stages.train import MIDTRAIN

if __name__ == "__main__":
    stage_main(MIDTRAIN)

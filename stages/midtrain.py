"""Stage `midtrain`: continue pre-training's final model on the knowledge/code/math-heavy mixture."""

from functools import partial

from pipeline.cli import stage_main
from pipeline.train.stage import run_training_stage

if __name__ == "__main__":
    stage_main("midtrain", partial(run_training_stage, "midtrain"))

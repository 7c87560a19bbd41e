"""Stage `pretrain`: pre-train the model from scratch on the broad mixture."""

from functools import partial

from pipeline.cli import stage_main
from pipeline.train.stage import run_training_stage

if __name__ == "__main__":
    stage_main("pretrain", partial(run_training_stage, "pretrain"))

"""Stage `sft`: instruction-tune mid-training's final model on chat conversations."""

from functools import partial

from pipeline.cli import stage_main
from pipeline.train.stage import run_training_stage

if __name__ == "__main__":
    stage_main("sft", partial(run_training_stage, "sft"))

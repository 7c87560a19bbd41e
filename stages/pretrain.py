"""Stage `pretrain`: pre-train the model from scratch on the broad mixture (pipeline/stages/train.py)."""

from pipeline.runner.cli import stage_main
from pipeline.stages.train import PRETRAIN

if __name__ == "__main__":
    stage_main(PRETRAIN)

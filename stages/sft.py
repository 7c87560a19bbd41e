"""Stage `sft`: instruction-tune mid-training's final model on chat conversations."""

from pipeline.runner.cli import stage_main
from pipeline.stages.train import SFT

if __name__ == "__main__":
    stage_main(SFT)

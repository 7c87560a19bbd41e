"""Stage `qat`: INT4 quantization-aware training of SFT's model, measured against PTQ."""

from pipeline.runner.cli import stage_main
from pipeline.stages.qat import QAT

if __name__ == "__main__":
    stage_main(QAT)

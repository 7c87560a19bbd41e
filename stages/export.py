"""Stage `export`: the converted INT4 model as .pte (ExecuTorch/XNNPACK), .pt2 and a Hugging Face directory."""

from pipeline.runner.cli import stage_main
from pipeline.stages.export import EXPORT

if __name__ == "__main__":
    stage_main(EXPORT)

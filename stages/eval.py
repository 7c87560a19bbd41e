"""Stage `eval_<target>`: score one model (pretrain, midtrain, sft or qat) on the evaluation suite.

usage: python stages/eval.py TARGET --params params.yaml
       python stages/eval.py TARGET [key=value ...] [-m]
"""

import sys

from pipeline.eval.config import TARGETS
from pipeline.runner.cli import stage_main
from pipeline.stages.eval import eval_stage

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python {sys.argv[0]} {{{','.join(TARGETS)}}} [--params params.yaml | key=value ...]")
    stage_main(eval_stage(sys.argv.pop(1)))

"""Stage `scaling_fit`: fit the scaling law to a sweep's points (pipeline/stages/scaling.py).

`python stages/scaling_fit.py [scaling.sweep=moe_grid]` (`make scaling-fit`).
"""

from pipeline.runner.cli import stage_main
from pipeline.stages.scaling import SCALING_FIT, prepare_fit

if __name__ == "__main__":
    stage_main(SCALING_FIT, config_name="scaling", prepare=prepare_fit)

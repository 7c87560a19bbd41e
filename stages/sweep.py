"""Stage `sweep_point`: one point of a scaling sweep (pipeline/stages/sweep.py).

`python stages/sweep.py -m sweep=moe_grid` runs the whole grid (`make sweep`).
"""

from pipeline.runner.cli import stage_main
from pipeline.stages.sweep import SWEEP_POINT, point_config

if __name__ == "__main__":
    stage_main(SWEEP_POINT, config_name="scaling", prepare=point_config)

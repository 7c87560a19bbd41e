"""`make plan`: the architecture planner on the fitted law (pipeline/stages/plan.py).

`python stages/plan.py --memory 3GB --flops 2e9 [--name planned] [Hydra overrides]`.
"""

import sys

from pipeline.stages.plan import main

if __name__ == "__main__":
    sys.exit(main())

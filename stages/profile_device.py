"""Stage `profile`: TTFT, prefill and decode tok/s of the exported MoE against its dense twins.

(Not `stages/profile.py`: a script's folder comes first on sys.path, and a file named
profile.py would shadow the standard library's `profile`, which cProfile imports.)
"""

from pipeline.runner.cli import stage_main
from pipeline.stages.profile import PROFILE

if __name__ == "__main__":
    stage_main(PROFILE)

"""Stage `report`: the recipe's HTML and markdown report, from every stage's published outputs."""

from pipeline.runner.cli import stage_main
from pipeline.stages.report import REPORT

if __name__ == "__main__":
    stage_main(REPORT)

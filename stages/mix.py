"""Stage `mix`: materialise the sources, train the tokenizer, write the three mixtures."""

from pipeline.runner.cli import stage_main
from pipeline.stages.mix import MIX

if __name__ == "__main__":
    stage_main(MIX)

"""Stage `mix`: materialise the sources, train the tokenizer, write the three mixtures."""


from pipeline.cli import stage_main
from pipeline.data.stage import run_mix_stage

if __name__ == "__main__":
    stage_main("mix", run_mix_stage)

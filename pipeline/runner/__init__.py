"""The stage runner: the one way any stage runs (validate, check inputs, lock, track,
work on Ray, publish, close). Stages declare themselves with :class:`Stage` in
:mod:`pipeline.stages`; ``stages/<name>.py`` calls :func:`stage_main`.

- :mod:`.run`       the ordered sequence every stage goes through
- :mod:`.spec`      Stage / StageContext / StageResult
- :mod:`.inputs`    checks of mixtures, tokenizers, checkpoints, data sources
- :mod:`.lock`      one run per stage output at a time
- :mod:`.cluster`   embedded or cluster Ray, resources checked before it starts
- :mod:`.train_job` the training loop as a Ray Train TorchTrainer job
- :mod:`.publish`   atomic publication of outputs
- :mod:`.cli`       stage scripts' command line (params.yaml or Hydra)
- :mod:`.preflight` whole-file validation of params.yaml for make
"""

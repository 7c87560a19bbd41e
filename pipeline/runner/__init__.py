"""The stage runner: the one way any stage runs (validate, check inputs, lock, track,
work on Ray, publish, close). Stages declare themselves with :class:`Stage` in
:mod:`pipeline.stages`; ``python -m pipeline.stages NAME`` calls :func:`stage_main`.

- :mod:`.run`       the ordered sequence every stage goes through
- :mod:`.spec`      Stage (with its Dvc place) / StageContext / StageResult / ResumePlan
- :mod:`.inputs`    checks of mixtures, tokenizers, checkpoints, data sources
- :mod:`.lock`      one run per stage output at a time
- :mod:`.cluster`   embedded or cluster Ray, resources checked before it starts
- :mod:`.repro`     ``make repro``: validate, no-op check, parent run, ``dvc repro`` in one Ray
- :mod:`.recipe_ray` one embedded Ray for a whole recipe, every stage joins it
- :mod:`.stage_server` a warm process whose forked children run the recipe's stages
- :mod:`.stage_client` what a stage process does to run in it; starting and stopping it
- :mod:`.train_job` the training loop as a Ray Train TorchTrainer job
- :mod:`.publish`   atomic publication of outputs
- :mod:`.artifacts` a training stage's loss-curve figure and pt2 LoggedModel
- :mod:`.cli`       a stage's command line (params.yaml or Hydra)
- :mod:`.preflight` whole-file validation of params.yaml
"""

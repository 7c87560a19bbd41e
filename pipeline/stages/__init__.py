"""The recipe's stages, each declared once as a :class:`~pipeline.runner.spec.Stage`:
what it reads, where it writes, which config it takes, its work and its place in
dvc.yaml (generated from these: :mod:`pipeline.stages.dvcfile`). How a stage runs
(validation, input checks, lock, tracking, Ray, publication) is the runner's job;
``python -m pipeline.stages NAME`` runs one."""

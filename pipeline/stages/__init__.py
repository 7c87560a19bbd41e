"""The recipe's stages, each declared once as a :class:`~pipeline.runner.spec.Stage`:
what it reads, where it writes, which config it takes, and its work. How a stage runs
(validation, input checks, lock, tracking, Ray, publication) is the runner's job."""

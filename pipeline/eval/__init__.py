"""Evaluation: task suites built from the recipe's held-out sources, public benchmark
loaders, the scoring harness, and an lm-evaluation-harness adapter."""

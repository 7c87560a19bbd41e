"""The on-device scaling law and the architecture planner.

- :mod:`.grid`      a sweep's sizes x architectures x token budgets, as model configs
- :mod:`.law`       the joint MoE law L(N, D, Ê, G, S) and its inputs from a config
- :mod:`.fit`       Huber fit in log space from a grid of starts; fit and held-out errors
- :mod:`.analysis`  MoE vs its dense twins, and the paired findings, measured
- :mod:`.planner`   architectures within INT4-memory and compute budgets; Pareto frontiers
- :mod:`.plots`, :mod:`.artifacts`  the fit's figures and published files

A domain package: it imports neither Ray, MLflow nor the recipe config.
"""

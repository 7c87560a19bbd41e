"""Queries over the recipe's MLflow runs: a recipe run's stages, each stage's latest
run for the report, a sweep's finished points. Read-only; every store failure is a
TrackingError naming the store."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pipeline.tracking.config import TrackingConfig, TrackingError, resolve_tracking_uri
from pipeline.tracking.lifecycle import PARENT_ENV
from pipeline.tracking.logger import client_for

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient


def runs_of_parent(parent_run_id: str, tracking_uri: str | None = None) -> list[Run]:
    """Nested runs of ``parent_run_id``, oldest first."""
    client = client_for(tracking_uri or resolve_tracking_uri(TrackingConfig()))
    exp_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs(
        [exp_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )


def runs_page(cfg: TrackingConfig, ui_url: str) -> str | None:
    """The address of the experiment's training runs under ``ui_url`` (the MLflow UI),
    or None before the experiment exists. A bare UI address opens MLflow's GenAI
    overview instead. Raises TrackingError when the store cannot be read."""
    uri = resolve_tracking_uri(cfg)
    try:
        experiment = client_for(uri).get_experiment_by_name(cfg.experiment)
    except Exception as err:  # noqa: BLE001 - any store failure: say which store
        raise TrackingError(f"cannot read the experiments of {uri}: {type(err).__name__}: {err}") from None
    if experiment is None:
        return None
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs"


OUT_DIR_PARAM = "stage.out_dir"  # the stage config's output directory, as every stage run logs it


def latest_stage_runs(
    cfg: TrackingConfig, stages: Sequence[str], ui_url: str, out_dirs: Mapping[str, str] | None = None
) -> dict[str, dict[str, str]]:
    """The newest FINISHED run of each stage in the experiment, as
    ``{stage: {"run_id", "url"}}`` with ``url`` the run's page under ``ui_url`` (the
    local MLflow UI, e.g. ``http://127.0.0.1:5000``). Stages without one are left out.
    With ``out_dirs``, a stage named there counts only runs that logged that
    ``stage.out_dir``: the recipe's own run, not a study of the same stage configured
    into another directory (``make qat-study``, a run by hand with another out_dir). A
    Hydra multirun point logs the configured out_dir although it writes into Hydra's
    folder, so it still passes this filter.
    Raises TrackingError when the store cannot be read or an out_dir cannot be quoted."""
    uri = resolve_tracking_uri(cfg)
    for stage, out_dir in (out_dirs or {}).items():
        if "'" in out_dir:
            raise TrackingError(f"{stage}: cannot search MLflow for an out_dir with a quote: {out_dir!r}")
    try:
        client = client_for(uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            return {}
        found = {}
        for stage in stages:
            query = f"tags.stage = '{stage}' and attributes.status = 'FINISHED'"
            if out_dirs and stage in out_dirs:
                query += f" and params.`{OUT_DIR_PARAM}` = '{out_dirs[stage]}'"
            runs = client.search_runs(
                [experiment.experiment_id],
                query,
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if runs:
                run_id = runs[0].info.run_id
                url = f"{ui_url.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs/{run_id}"
                found[stage] = {"run_id": run_id, "url": url}
        return found
    except Exception as err:  # noqa: BLE001 - any store failure: say which store
        raise TrackingError(f"cannot read the stage runs from {uri}: {type(err).__name__}: {err}") from None


def _search_experiment(client: MlflowClient, cfg: TrackingConfig) -> str | None:
    """The experiment stage runs of this process go to: the parent run's when one is set
    (children join it), else ``cfg.experiment``'s; None if it does not exist yet."""
    parent_id = os.environ.get(PARENT_ENV)
    if parent_id:
        return client.get_run(parent_id).info.experiment_id
    experiment = client.get_experiment_by_name(cfg.experiment)
    return None if experiment is None else experiment.experiment_id


def finished_stage_run(cfg: TrackingConfig, stage: str, resume_key: str, tags: Mapping[str, str]) -> dict | None:
    """The final metrics (``final/`` prefix removed) of the newest FINISHED run of
    ``stage`` with this ``resume_key`` and every tag in ``tags``, or None if there is
    none: a sweep point that already ran to the end is not run again. Raises
    TrackingError when the store cannot be read."""
    uri = resolve_tracking_uri(cfg)
    query = " and ".join(
        [f"tags.stage = '{stage}'", f"tags.resume_key = '{resume_key}'", "attributes.status = 'FINISHED'"]
        + [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    )
    try:
        client = client_for(uri)
        experiment_id = _search_experiment(client, cfg)
        if experiment_id is None:
            return None
        runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    except Exception as err:  # noqa: BLE001 - any store failure: say which store
        raise TrackingError(f"cannot search the finished {stage} runs in {uri}: {type(err).__name__}: {err}") from None
    if not runs:
        return None
    metrics = runs[0].data.metrics
    return {"run_id": runs[0].info.run_id, **{k[6:]: v for k, v in metrics.items() if k.startswith("final/")}}


def tagged_runs(cfg: TrackingConfig, tags: Mapping[str, str], status: str = "FINISHED") -> list[Run]:
    """Every run of the experiment with all ``tags`` and ``status``, oldest first
    (e.g. the points of one sweep). Raises TrackingError when the store cannot be read."""
    uri = resolve_tracking_uri(cfg)
    query = " and ".join([f"attributes.status = '{status}'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()])
    try:
        client = client_for(uri)
        experiment_id = _search_experiment(client, cfg)
        if experiment_id is None:
            return []
        runs, token = [], None
        while True:
            page = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs
    except Exception as err:  # noqa: BLE001 - any store failure: say which store
        raise TrackingError(
            f"cannot search the runs tagged {dict(tags)} in {uri}: {type(err).__name__}: {err}"
        ) from None

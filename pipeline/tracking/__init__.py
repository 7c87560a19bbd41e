"""MLflow, in one place: stores, run layout, lineage tags, artifacts, datasets.

- :mod:`.config`    where tracking goes (``TrackingConfig``) and a fast reachability check
- :mod:`.keys`      legal, collision-free MLflow keys from nested config
- :mod:`.resilient` retries with backoff; tracking that is lost never stops training
- :mod:`.lineage`   git commit and DVC input hashes of a stage run
- :mod:`.lifecycle` the experiment, parent and nested runs, orphan closing, resume
- :mod:`.logger`    one picklable logger for a run, used by the driver and Ray workers
- :mod:`.queries`   a recipe's runs, each stage's latest run, a sweep's finished points

Nothing here runs at import: mlflow is imported lazily so that ``import pipeline`` stays
cheap and side-effect free (importing mlflow takes seconds).
"""

from pipeline.tracking.config import (
    DEFAULT_EXPERIMENT,
    REPO_ROOT,
    TrackingConfig,
    TrackingError,
    check_store,
    default_artifact_root,
    resolve_tracking_uri,
)
from pipeline.tracking.keys import (
    MAX_DATASET_DIGEST,
    MAX_KEY,
    MAX_PARAM_VALUE,
    MAX_PARAMS_PER_BATCH,
    MAX_TAG_VALUE,
    flatten_params,
    sanitize_key,
)
from pipeline.tracking.lifecycle import (
    PARENT_ENV,
    close_orphans,
    end_recipe_run,
    ensure_experiment,
    stage_run,
    start_recipe_run,
)
from pipeline.tracking.lineage import dvc_input_hashes, git_tags
from pipeline.tracking.logger import RunLogger
from pipeline.tracking.queries import OUT_DIR_PARAM, finished_stage_run, latest_stage_runs, runs_of_parent, tagged_runs
from pipeline.tracking.resilient import Resilient, read_journal

__all__ = [
    "DEFAULT_EXPERIMENT",
    "MAX_DATASET_DIGEST",
    "MAX_KEY",
    "MAX_PARAMS_PER_BATCH",
    "MAX_PARAM_VALUE",
    "MAX_TAG_VALUE",
    "PARENT_ENV",
    "REPO_ROOT",
    "Resilient",
    "RunLogger",
    "TrackingConfig",
    "TrackingError",
    "check_store",
    "close_orphans",
    "default_artifact_root",
    "dvc_input_hashes",
    "end_recipe_run",
    "ensure_experiment",
    "finished_stage_run",
    "OUT_DIR_PARAM",
    "latest_stage_runs",
    "flatten_params",
    "git_tags",
    "read_journal",
    "resolve_tracking_uri",
    "runs_of_parent",
    "sanitize_key",
    "stage_run",
    "start_recipe_run",
    "tagged_runs",
]

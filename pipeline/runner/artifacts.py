"""What a training stage logs besides numbers: its loss curve as a figure and its final
model as an MLflow LoggedModel in torch.export (pt2) form.

Kept out of the tracking layer, which only moves bytes: the figure is drawn here and the
model is exported here; both are handed to the stage run's
:class:`~pipeline.tracking.logger.RunLogger` (best effort, like every tracking call).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.tracking import RunLogger, TrackingError
from pipeline.tracking.keys import sanitize_key

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from matplotlib.figure import Figure


def loss_curve_figure(history: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """One line per series (step on x), log-scale y when every value is positive."""
    from matplotlib.figure import Figure

    # A bare Figure renders with the Agg canvas and never touches pyplot's global
    # state or a GUI backend, which matters inside Ray workers and headless CI.
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    positive = True
    for series, points in history.items():
        if not points:
            continue
        steps, values = zip(*points)
        positive = positive and min(values) > 0
        ax.plot(steps, values, label=series)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def log_loss_curve(run: RunLogger, history: Mapping[str, Sequence[tuple[int, float]]], name: str) -> None:
    """The loss curves as ``plots/<name>`` in the stage's run."""
    if run.enabled:
        run.log_figure(loss_curve_figure(history), name if name.endswith(".png") else f"{name}.png")


def log_model(
    run: RunLogger, model: torch.nn.Module, input_example: torch.Tensor, name: str, dynamic_dims: Sequence[int] = (0, 1)
) -> str | None:
    """Log ``model`` into ``run`` as an MLflow 3 LoggedModel in pt2 (torch.export) form;
    returns its URI (None when tracking is off or the store failed: a lost log).

    ``dynamic_dims`` are the input dims left symbolic (batch and sequence for token ids
    ``[B, T]``). MLflow marks only those as ``Dim.AUTO``; a size-1 example dim is
    specialised to 1 by torch.export, so pass ``T > 1``. The model is exported in eval
    mode (dropout off) and its training flag restored afterwards. If torch.export cannot
    trace the model this raises TrackingError: there is deliberately no pickle fallback,
    because pickled models execute code on load.
    """
    if not run.enabled:
        return None
    import torch

    if not isinstance(input_example, torch.Tensor):
        raise TrackingError(f"log_model({name}): input_example must be a tensor, got {type(input_example).__name__}")
    was_training = model.training
    model.eval()
    try:
        info = run.guard(f"model {name}", _log_pt2_model, run, model, input_example, name, dynamic_dims)
    except TrackingError:
        raise
    except Exception as err:
        raise TrackingError(
            f"log_model({name}): exporting {type(model).__name__} with torch.export (pt2) failed: "
            f"{type(err).__name__}: {err}"
        ) from err
    finally:
        model.train(was_training)
    return info.model_uri if info is not None else None


def _log_pt2_model(run: RunLogger, model, example, name: str, dynamic_dims: Sequence[int]):
    import mlflow
    import mlflow.pytorch
    import torch

    with torch.no_grad():
        output = model(example)
    # The flavour's log_model reads the store from MLflow's process-wide URI. With no
    # active run it would file a new model under the default experiment: the model is
    # created here, in the run's experiment, and the run is named by id.
    mlflow.set_tracking_uri(run.tracking_uri)
    source = run.client.get_run(run.run_id)
    logged = run.client.create_logged_model(
        source.info.experiment_id, sanitize_key(name).replace("/", "_"), source_run_id=run.run_id
    )
    return mlflow.pytorch.log_model(
        model,
        name=logged.name,
        model_id=logged.model_id,
        input_example=example.cpu().numpy(),
        signature=_tensor_signature(example, output, dynamic_dims),
        serialization_format="pt2",
        # Explicit requirements skip MLflow's requirement inference, which re-imports
        # the model in a subprocess (~6 s) and warns about "+cpu" tags.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        # MLflow's check that the example serves loads the model back and predicts (about
        # 3 s a stage) and only warns when that fails; tests/e2e loads a logged model and
        # checks its prediction instead. (Not a named parameter: it reaches Model.log through
        # **kwargs; with serialization_format="pt2" nothing passes it on to torch.save.)
        validate_serving_input=False,
        run_id=run.run_id,
    )


def _tensor_signature(example: torch.Tensor, output: Any, dynamic_dims: Sequence[int]):
    import numpy as np
    import torch
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def spec(t: torch.Tensor, dyn: Sequence[int]) -> TensorSpec:
        shape = tuple(-1 if i in dyn else s for i, s in enumerate(t.shape))
        return TensorSpec(np.dtype(str(t.dtype).removeprefix("torch.")), shape)

    dims = [d % example.ndim for d in dynamic_dims]
    outputs = None
    if isinstance(output, torch.Tensor) and output.dtype != torch.bfloat16:
        # Output dims that follow the dynamic input dims (logits [B, T, V]) are dynamic too.
        outputs = Schema([spec(output, [d for d in dims if d < output.ndim])])
    return ModelSignature(inputs=Schema([spec(example, dims)]), outputs=outputs)

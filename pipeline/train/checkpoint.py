"""Checkpoints: one flat directory of safetensors plus JSON metadata, written atomically,
read without pickle.

A checkpoint directory::

    model.safetensors      model state dict (tied aliases stored once, see below)
    optimizer.safetensors  optimizer state as torch.distributed.checkpoint's get_state_dict
                           gives it, keyed by parameter FQN: tensors "<fqn>/<key>",
                           param groups and non-tensor state in the file's JSON header
    extra.safetensors      other named tensors (RNG states as uint8, ...)
    meta.json              {"checkpoint": {...format info...}, **caller's meta}

Which checkpoint of a run is the latest is Ray Train's to say (it registers each one and
keeps ``num_to_keep``); the published model of a stage is one such directory.

State through torch: model and optimizer state come from ``get_state_dict`` and go back
through ``set_state_dict`` (:func:`training_state`, :func:`restore_training_state`), so
parameters are matched by fully qualified name and FSDP2's sharded parameters are
gathered into full tensors (``full_state_dict``) with no code of ours.

Atomicity: everything is written into a hidden sibling ``.tmp-<name>-<random>/``,
fsynced, and renamed into place in one ``os.rename``: a crash leaves no directory or
a complete one, never a half-written one (a hard kill may leave a ``.tmp-*`` sibling,
which nothing reads).

Integrity: ``meta.json`` records each file's size and sha256. The size check is cheap
(:func:`problem`); the hashes are checked on load, so a flipped byte is reported instead
of resumed from. A checkpoint whose tensors are not all finite is refused at write time:
it could only be resumed into the same failure.

Tied weights are stored once and come back under every name
(:mod:`pipeline.train.tensorfile`).

Older layouts: format 1 and 2 directories read as they are; a format 1/2 *root*
(``latest.json`` + ``step_N/``) is refused with the command that flattens it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.hashing import sha256_file
from pipeline.train.tensorfile import (  # noqa: F401 - the tensor-spec helpers are part of this API
    CheckpointError,
    TensorSpec,
    check_fits,
    dedupe_aliases,
    fsync_dir,
    parse_header,
    read_tensors,
    restore_aliases,
    save_tensors,
    spec_of,
)
from pipeline.train.tensorfile import tensor_specs as file_specs

FORMAT_VERSION = 2  # the directory's own format; 2 adds per-file sha256, 1 is still read
READABLE_VERSIONS = (1, 2)
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EXTRA_FILE = "extra.safetensors"
META_FILE = "meta.json"
LEGACY_POINTER = "latest.json"  # the root of formats 1 and 2 (latest.json + step_N/)
_RESERVED_META_KEY = "checkpoint"
_TMP_PREFIX = ".tmp-"


@dataclass
class Checkpoint:
    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    meta: dict[str, Any]
    # get_state_dict's optimizer state: {"state": {fqn: {key: value}}, "param_groups":
    # [{**hyperparameters, "params": [fqn, ...]}]}, or None.
    optimizer_state: dict[str, Any] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- through torch


def _options(model: torch.nn.Module, saving: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.tensor import DTensor

    # Full tensors where parameters are sharded: saving gathers them into rank 0's CPU
    # memory only (cpu_offload; the other ranks get empty dicts), so no device ever holds
    # the whole model and optimizer state, the case FSDP2 is for; loading takes each
    # rank's shards from the full tensors read from the file. A model that is not sharded
    # takes the plain path (the full-state load path wants optimizer state that a fresh
    # optimizer does not have yet).
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    return StateDictOptions(full_state_dict=sharded, cpu_offload=sharded and saving)


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) keyed by FQN, from torch's ``get_state_dict``.

    Collective for a sharded model (every rank calls it); then only rank 0 receives the
    state (full tensors on the CPU), the other ranks empty dicts."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_options(model, saving=True))


def restore_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Load ``ckpt``'s model and optimizer state through torch's ``set_state_dict``
    (parameters matched by FQN). Raises CheckpointError when it holds no optimizer state
    or the parameters differ."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    if ckpt.optimizer_state is None:
        raise CheckpointError(f"{ckpt.path}: checkpoint has no optimizer state")
    saved = {p for g in ckpt.optimizer_state["param_groups"] for p in g["params"]}
    # The names of the parameters this optimizer holds, as get_state_dict keys them (the
    # module tree's names), found without gathering a sharded model.
    names = {id(p): name for name, p in model.named_parameters()}
    current = {names.get(id(p), "<not a parameter of the model>") for g in optimizer.param_groups for p in g["params"]}
    if saved != current:
        raise CheckpointError(
            f"{ckpt.path}: optimizer parameters differ: missing {sorted(current - saved)[:10]}, "
            f"unexpected {sorted(saved - current)[:10]}"
        )
    # JSON has no tuples (Adam's betas): give each value the type the optimizer holds.
    kinds = {k: type(v) for g in optimizer.param_groups for k, v in g.items()}
    groups = [
        {k: tuple(v) if kinds.get(k) is tuple and isinstance(v, list) else v for k, v in g.items()}
        for g in ckpt.optimizer_state["param_groups"]
    ]
    optim = {"state": ckpt.optimizer_state["state"], "param_groups": groups}
    set_state_dict(
        model,
        optimizer,
        model_state_dict=ckpt.model_state,
        optim_state_dict=optim,
        options=_options(model, saving=False),
    )


# --------------------------------------------------------------------------- saving


def save_checkpoint(
    path: Path,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
    *,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint directory ``path`` atomically; returns ``path``.

    ``optimizer_state`` is get_state_dict's (:func:`training_state`), or None for
    weights only. A checkpoint is written once: ``path`` must not exist (replacing a
    directory takes two renames, and a kill between them would lose both). Raises
    CheckpointError for an existing path, a negative step, a reserved or non-JSON meta
    key, or a non-finite tensor."""
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step must be an integer >= 0, got {step!r}")
    if _RESERVED_META_KEY in meta:
        raise CheckpointError(f"meta key {_RESERVED_META_KEY!r} is reserved for the format")
    _require_finite(model_state, "model")
    if optimizer_state is not None:
        flat = {f"{n}/{k}": v for n, st in optimizer_state["state"].items() for k, v in st.items()}
        _require_finite(flat, "optimizer")
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"{path} exists: a checkpoint directory is written once, into a new path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{_TMP_PREFIX}{path.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_contents(tmp, step, model_state, optimizer_state, meta, extra)
        fsync_dir(tmp)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_contents(tmp: Path, step: int, model_state, optimizer_state, meta, extra) -> None:
    tensors, aliases = dedupe_aliases(model_state)
    save_tensors(tmp / MODEL_FILE, tensors, {"aliases": json.dumps(aliases)})
    files = [MODEL_FILE]
    if optimizer_state is not None:
        opt_tensors, header = _flatten_optimizer(optimizer_state)
        save_tensors(tmp / OPTIMIZER_FILE, opt_tensors, {"optimizer": json.dumps(header)})
        files.append(OPTIMIZER_FILE)
    if extra:
        extra_tensors, extra_aliases = dedupe_aliases(extra)
        save_tensors(tmp / EXTRA_FILE, extra_tensors, {"aliases": json.dumps(extra_aliases)})
        files.append(EXTRA_FILE)
    sizes = {name: (tmp / name).stat().st_size for name in files}
    hashes = {name: sha256_file(tmp / name) for name in files}
    info = {"format_version": FORMAT_VERSION, "step": step, "files": sizes, "sha256": hashes}
    try:
        text = json.dumps({_RESERVED_META_KEY: info, **meta}, indent=2, sort_keys=True)
    except TypeError as err:
        raise CheckpointError(f"meta is not JSON-serialisable: {err}") from None
    _write_text_synced(tmp / META_FILE, text)


def _flatten_optimizer(optimizer_state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """get_state_dict's optimizer state as safetensors tensors "<fqn>/<key>" plus a JSON
    header: the groups' hyperparameters and FQNs, and non-tensor per-parameter state."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, state in optimizer_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [
        {"hparams": {k: _jsonable(v) for k, v in g.items() if k != "params"}, "params": list(g["params"])}
        for g in optimizer_state["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], header: dict) -> dict[str, Any]:
    """Inverse of :func:`_flatten_optimizer` (formats 1 and 2 wrote the same layout)."""
    state: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, sub = key.rpartition("/")
        # Optimizers that are neither fused nor capturable keep "step" on the CPU (a
        # device tensor would cost a synchronisation per parameter and step);
        # load_state_dict moves it to the device itself for those that want it there.
        state.setdefault(name, {})[sub] = tensor.cpu() if sub == "step" else tensor
    for name, values in header.get("scalars", {}).items():
        state.setdefault(name, {}).update(values)
    groups = [{**g["hparams"], "params": list(g["params"])} for g in header["param_groups"]]
    return {"state": state, "param_groups": groups}


def _require_finite(state: Mapping[str, Any], what: str) -> None:
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"refusing to write a checkpoint whose {what} tensor {name!r} holds non-finite "
                f"values (NaN/inf): resuming from it would repeat the failure"
            )


def _jsonable(value: Any) -> Any:
    # Hyperparameters may be tensors (tensor lr) or tuples (betas); JSON keeps their values.
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def capture_rng_state() -> dict[str, torch.Tensor]:
    """Torch RNG states as uint8 tensors, ready for ``save_checkpoint(extra=...)``."""
    states = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"rng/cuda{i}"] = s
    return states


def restore_rng_state(extra: Mapping[str, torch.Tensor]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states are restored only if present."""
    if "rng/cpu" in extra:
        torch.set_rng_state(extra["rng/cpu"].cpu())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"rng/cuda{i}" in extra:
                torch.cuda.set_rng_state(extra[f"rng/cuda{i}"].cpu(), i)


# --------------------------------------------------------------------------- loading


def problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint directory, or None. Cheap: reads
    meta.json and file sizes, no tensor. A format 1/2 root is named as such, with the
    command that flattens it into a directory this code reads."""
    path = Path(path)
    if path.is_dir() and not (path / META_FILE).exists() and (path / LEGACY_POINTER).is_file():
        try:
            step_dir = json.loads((path / LEGACY_POINTER).read_text())["dir"]
        except (OSError, ValueError, KeyError, TypeError):
            step_dir = "step_<N>"
        return (
            f"a checkpoint root of the older layout ({LEGACY_POINTER} + step_N/); a checkpoint is now one "
            f"directory. Re-run the stage that wrote it, or flatten it: "
            f"mv {path}/{step_dir}/* {path}/ && rm -r {path}/{step_dir} {path}/{LEGACY_POINTER}"
        )
    return _problem(path)


def tensor_specs(path: Path) -> dict[str, TensorSpec]:
    """Name -> (shape, dtype) of a checkpoint's model tensors, tied aliases included, read
    from the safetensors header without loading any tensor data."""
    return file_specs(Path(path) / MODEL_FILE)


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is complete and every file matches the
    sha256 recorded when it was written (reads every byte, loads no tensor)."""
    path = Path(path)
    why = problem(path)
    if why is not None:
        raise CheckpointError(f"{path}: {why}")
    info = json.loads((path / META_FILE).read_text())[_RESERVED_META_KEY]
    for name, digest in (info.get("sha256") or {}).items():
        if sha256_file(path / name) != digest:
            raise CheckpointError(f"{path}: {name} does not match the sha256 recorded at write time (corrupt)")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Read a checkpoint directory (safetensors and JSON only: never pickle).

    ``verify`` checks every file against its recorded sha256 first. Raises
    CheckpointError naming the directory and what is wrong with it."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    why = problem(path)
    if why is not None:
        raise CheckpointError(f"{path}: {why}")
    full = json.loads((path / META_FILE).read_text())
    info = full.pop(_RESERVED_META_KEY)
    device = str(map_location)
    model_state, model_header = read_tensors(path / MODEL_FILE, device)
    model_state = restore_aliases(path / MODEL_FILE, model_state, model_header)
    optimizer_state = None
    if OPTIMIZER_FILE in info["files"]:
        tensors, header = read_tensors(path / OPTIMIZER_FILE, device)
        optimizer_state = _unflatten_optimizer(tensors, parse_header(path / OPTIMIZER_FILE, header, "optimizer"))
    extra: dict[str, torch.Tensor] = {}
    if EXTRA_FILE in info["files"]:
        extra, header = read_tensors(path / EXTRA_FILE, device)
        extra = restore_aliases(path / EXTRA_FILE, extra, header)
    return Checkpoint(path, info["step"], model_state, full, optimizer_state, extra)


def _problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None. Cheap: no tensor reads."""
    if not path.is_dir():
        return "checkpoint directory does not exist"
    meta_path = path / META_FILE
    try:
        full = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return f"missing {META_FILE}"
    except (OSError, ValueError) as err:
        return f"unreadable {META_FILE} ({err})"
    info = full.get(_RESERVED_META_KEY) if isinstance(full, dict) else None
    if not isinstance(info, dict):
        return f"{META_FILE} lacks the required {_RESERVED_META_KEY!r} section"
    for key in ("format_version", "step", "files"):
        if key not in info:
            return f"{META_FILE} lacks required key {_RESERVED_META_KEY}.{key}"
    if info["format_version"] not in READABLE_VERSIONS:
        return f"unsupported format_version {info['format_version']} (this code reads {READABLE_VERSIONS})"
    if not isinstance(info["files"], dict) or MODEL_FILE not in info["files"]:
        return f"{META_FILE} lists no {MODEL_FILE}"
    for name, size in info["files"].items():
        file = path / name
        if not file.is_file():
            return f"missing {name}"
        # Sizes recorded at write time catch truncation without parsing the tensors.
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, expected {size} (truncated or overwritten)"
    return None


# --------------------------------------------------------------------------- filesystem


def _write_text_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())

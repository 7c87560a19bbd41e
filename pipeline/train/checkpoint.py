"""Checkpoints: safetensors plus JSON metadata, written atomically, read without pickle.

Layout under a checkpoint root::

    root/
      latest.json            {"step": N, "dir": "step_N"}  (the commit point)
      step_N/
        model.safetensors    model state dict (tied aliases dropped, see below)
        optimizer.safetensors per-parameter optimizer state keyed "<param name>/<key>";
                             param-group hyperparameters in the file's JSON header
        extra.safetensors    other named tensors (RNG states as uint8, ...)
        meta.json            {"checkpoint": {...format info...}, **caller's meta}

Atomicity: everything is written into ``root/.tmp-step_N-<random>/``, fsynced, and
renamed to ``step_N`` in one ``os.replace``; only then is ``latest.json`` replaced (also
via a temp file). A crash at any point leaves either the previous checkpoint as latest
or the new one complete, never a half-written ``step_N``.

Integrity: ``meta.json`` records each file's size and sha256. The size check is cheap
and done whenever a directory is considered (:func:`latest_checkpoint`); the hashes are
checked on load, so a flipped byte is reported instead of resumed from. A checkpoint
whose tensors are not all finite is refused at write time: it could only be resumed
into the same failure.

Tied weights: safetensors refuses tensors that share storage. Exact aliases (same
storage, offset, shape, stride, e.g. tied embedding/output weights) are saved once under
their first name and the other names are recorded in the model file's header; loading
puts the *same* tensor back under every alias, so ``model.load_state_dict`` copies equal
values into each name and weights tied by the module stay tied. Partial overlaps (views)
are cloned.

Optimizer state is keyed by parameter *name*, not by position, so a checkpoint restores
correctly after parameters are reordered or regrouped.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.hashing import sha256_file

FORMAT_VERSION = 2  # 2 adds per-file sha256; 1 is still read
READABLE_VERSIONS = (1, 2)
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EXTRA_FILE = "extra.safetensors"
META_FILE = "meta.json"
LATEST_FILE = "latest.json"
_RESERVED_META_KEY = "checkpoint"
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    meta: dict[str, Any]
    # {"state": {"<name>/<key>": tensor}, "scalars": {...}, "param_groups": [...]} or None.
    optimizer_state: dict[str, Any] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------- saving


def save_checkpoint(
    root: Path,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    meta: Mapping[str, Any],
    keep_last: int | None = 2,
    *,
    param_names: Sequence[str] | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``root/step_<step>`` atomically, point ``latest.json`` at it, prune old ones.

    ``param_names`` names the optimizer's parameters in optimizer order (see
    :func:`optimizer_param_names`); when omitted they are found by storage identity in
    ``model_state`` (works when it came from ``model.state_dict()`` on the same device).
    ``keep_last=None`` keeps every checkpoint.
    """
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step must be an integer >= 0, got {step!r}")
    if keep_last is not None and keep_last < 1:
        raise CheckpointError(f"keep_last must be >= 1 or None, got {keep_last}")
    if _RESERVED_META_KEY in meta:
        raise CheckpointError(f"meta key {_RESERVED_META_KEY!r} is reserved for the format")
    _require_finite(model_state, "model")
    if optimizer is not None:
        _require_finite(
            {
                f"{i}/{k}": v
                for i, st in optimizer.state_dict()["state"].items()
                for k, v in st.items()
                if isinstance(v, torch.Tensor)
            },
            "optimizer",
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / _step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_contents(tmp, step, model_state, optimizer, meta, param_names, extra)
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_json_atomic(root / LATEST_FILE, {"step": step, "dir": final.name})
    if keep_last is not None:
        _prune(root, keep=final, keep_last=keep_last)
    return final


def _write_contents(
    tmp: Path,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    meta: Mapping[str, Any],
    param_names: Sequence[str] | None,
    extra: Mapping[str, torch.Tensor] | None,
) -> None:
    tensors, aliases = _dedupe_aliases(model_state)
    _save_tensors(tmp / MODEL_FILE, tensors, {"aliases": json.dumps(aliases)})
    files = [MODEL_FILE]
    if optimizer is not None:
        names = list(param_names) if param_names is not None else _names_by_identity(optimizer, model_state)
        opt_tensors, header = _flatten_optimizer(optimizer, names)
        _save_tensors(tmp / OPTIMIZER_FILE, opt_tensors, {"optimizer": json.dumps(header)})
        files.append(OPTIMIZER_FILE)
    if extra:
        extra_tensors, extra_aliases = _dedupe_aliases(extra)
        _save_tensors(tmp / EXTRA_FILE, extra_tensors, {"aliases": json.dumps(extra_aliases)})
        files.append(EXTRA_FILE)
    sizes = {name: (tmp / name).stat().st_size for name in files}
    hashes = {name: sha256_file(tmp / name) for name in files}
    info = {"format_version": FORMAT_VERSION, "step": step, "files": sizes, "sha256": hashes}
    try:
        text = json.dumps({_RESERVED_META_KEY: info, **meta}, indent=2, sort_keys=True)
    except TypeError as err:
        raise CheckpointError(f"meta is not JSON-serialisable: {err}") from None
    _write_text_synced(tmp / META_FILE, text)


def _require_finite(state: Mapping[str, Any], what: str) -> None:
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(
                f"refusing to write a checkpoint whose {what} tensor {name!r} holds non-finite "
                f"values (NaN/inf): resuming from it would repeat the failure"
            )


def _dedupe_aliases(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (tensors safetensors accepts, {alias name: canonical name})."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    exact: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"state entry {name!r} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach()
        if tensor.numel() == 0:
            # Empty tensors have no real storage (data_ptr may be 0 for all of them).
            out[name] = tensor.contiguous()
            continue
        ptr = tensor.untyped_storage().data_ptr()
        key = (tensor.device, ptr, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if key in exact:
            aliases[name] = exact[key]
            continue
        exact[key] = name
        # A different view into storage already saved must become its own copy.
        shared = (tensor.device, ptr) in storages
        storages.add((tensor.device, ptr))
        out[name] = tensor.clone() if shared else tensor.contiguous()
    return out, aliases


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=header)
    _fsync_file(path)


# --------------------------------------------------------------------------- optimizer


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of ``optimizer``'s parameters in optimizer order (groups flattened)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in by_id:
                raise CheckpointError(f"optimizer param_groups[{gi}] holds a parameter not in the model")
            names.append(by_id[id(p)])
    return names


def _names_by_identity(optimizer: torch.optim.Optimizer, model_state: Mapping[str, torch.Tensor]) -> list[str]:
    # state_dict() tensors share storage with the parameters; first name wins, which is
    # also the name named_parameters() reports for tied parameters.
    by_ptr: dict[tuple, str] = {}
    for name, t in model_state.items():
        if t.numel():
            by_ptr.setdefault((t.device, t.data_ptr(), tuple(t.shape)), name)
    names = []
    for p in _optimizer_params(optimizer):
        name = by_ptr.get((p.device, p.data_ptr(), tuple(p.shape)))
        if name is None:
            raise CheckpointError(
                "cannot match an optimizer parameter to a model_state entry by storage; "
                "pass param_names=optimizer_param_names(model, optimizer)"
            )
        names.append(name)
    return names


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _flatten_optimizer(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    n_params = sum(len(g["params"]) for g in sd["param_groups"])
    if len(names) != n_params:
        raise CheckpointError(f"param_names has {len(names)} names but the optimizer holds {n_params} params")
    if len(set(names)) != len(names):
        raise CheckpointError("param_names contains duplicates")
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups = []
    index = 0
    for group in sd["param_groups"]:
        group_names = []
        for idx in group["params"]:
            name = names[index]
            index += 1
            group_names.append(name)
            for key, value in sd["state"].get(idx, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{key}"] = value.detach().contiguous()
                else:
                    scalars.setdefault(name, {})[key] = value
        hparams = {k: _jsonable(v) for k, v in group.items() if k != "params"}
        groups.append({"hparams": hparams, "params": group_names})
    header = {"class": type(optimizer).__name__, "param_groups": groups, "scalars": scalars}
    return tensors, header


def _jsonable(value: Any) -> Any:
    # Hyperparameters may be tensors (tensor lr) or tuples (betas); JSON keeps their values.
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def restore_optimizer(optimizer: torch.optim.Optimizer, model_param_names: Sequence[str], ckpt: Checkpoint) -> None:
    """Load ``ckpt``'s optimizer state into ``optimizer``, matching parameters by name.

    ``model_param_names`` names ``optimizer``'s parameters in its current order (see
    :func:`optimizer_param_names`). Each current group takes the hyperparameters of the
    saved group its parameters were in; a group mixing parameters from different saved
    groups is an error because its hyperparameters would be ambiguous.
    """
    saved = ckpt.optimizer_state
    if saved is None:
        raise CheckpointError(f"{ckpt.path}: checkpoint has no optimizer state")
    names = list(model_param_names)
    current = optimizer.param_groups
    n_params = sum(len(g["params"]) for g in current)
    if len(names) != n_params:
        raise CheckpointError(f"model_param_names has {len(names)} names but the optimizer holds {n_params} params")
    if saved["class"] != type(optimizer).__name__:
        raise CheckpointError(
            f"{ckpt.path}: saved optimizer is {saved['class']}, restoring into {type(optimizer).__name__}"
        )
    group_of = {name: gi for gi, g in enumerate(saved["param_groups"]) for name in g["params"]}
    missing = sorted(set(names) - set(group_of))
    unexpected = sorted(set(group_of) - set(names))
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt.path}: optimizer parameters differ: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    per_param: dict[str, dict[str, Any]] = {}
    for key, tensor in saved["state"].items():
        name, _, sub = key.rpartition("/")
        per_param.setdefault(name, {})[sub] = tensor
    for values in per_param.values():
        # Non-capturable optimizers expect "step" on the CPU; load_state_dict moves it
        # to the parameter's device itself when the optimizer is capturable or fused.
        if isinstance(values.get("step"), torch.Tensor):
            values["step"] = values["step"].cpu()
    for name, values in saved["scalars"].items():
        per_param.setdefault(name, {}).update(values)

    state: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for gi, group in enumerate(current):
        group_names = names[index : index + len(group["params"])]
        sources = {group_of[n] for n in group_names}
        if len(sources) > 1:
            raise CheckpointError(f"optimizer param_groups[{gi}] mixes parameters from saved groups {sorted(sources)}")
        hparams = dict(saved["param_groups"][sources.pop()]["hparams"]) if group_names else {}
        for key, value in hparams.items():
            if isinstance(group.get(key), tuple) and isinstance(value, list):
                hparams[key] = tuple(value)
            elif isinstance(group.get(key), torch.Tensor):
                hparams[key] = torch.as_tensor(value, dtype=group[key].dtype, device=group[key].device)
        groups.append({**hparams, "params": list(range(index, index + len(group_names)))})
        for offset, name in enumerate(group_names):
            if name in per_param:
                state[index + offset] = per_param[name]
        index += len(group_names)
    # load_state_dict casts state tensors to each parameter's device/dtype (step excepted).
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------- RNG


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


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None.

    ``latest.json`` is trusted when it points at a complete directory. If it is missing,
    unreadable or stale (e.g. a crash between the directory rename and the pointer
    update), the newest complete ``step_*`` directory wins; ``.tmp-*`` leftovers are never
    considered.
    """
    root = Path(root)
    pointer = root / LATEST_FILE
    try:
        target = root / json.loads(pointer.read_text())["dir"]
        if _problem(target) is None:
            return target
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for _step, path in sorted(_step_dirs(root), reverse=True):
        if _problem(path) is None:
            return path
    return None


def newest_problem(root: Path) -> str | None:
    """Why the newest ``step_*`` directory under ``root`` is not a complete checkpoint
    (``"<dir>: <problem>"``), or None when there is no step directory at all."""
    steps = sorted(_step_dirs(Path(root)), reverse=True)
    if not steps:
        return None
    path = steps[0][1]
    return f"{path}: {_problem(path) or 'complete'}"


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is complete and every file matches the
    sha256 recorded when it was written (reads every byte, loads no tensor)."""
    path = Path(path)
    problem = _problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    info = json.loads((path / META_FILE).read_text())[_RESERVED_META_KEY]
    for name, digest in (info.get("sha256") or {}).items():
        if sha256_file(path / name) != digest:
            raise CheckpointError(f"{path}: {name} does not match the sha256 recorded at write time (corrupt)")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Read a checkpoint directory (safetensors and JSON only: never pickle).

    ``verify`` checks every file against its recorded sha256 first."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    problem = _problem(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    full = json.loads((path / META_FILE).read_text())
    info = full.pop(_RESERVED_META_KEY)
    device = str(map_location)
    model_state, model_header = _read_tensors(path / MODEL_FILE, device)
    model_state = _restore_aliases(path / MODEL_FILE, model_state, model_header)
    optimizer_state = None
    if OPTIMIZER_FILE in info["files"]:
        tensors, header = _read_tensors(path / OPTIMIZER_FILE, device)
        opt = _parse_header(path / OPTIMIZER_FILE, header, "optimizer")
        optimizer_state = {"state": tensors, **opt}
    extra: dict[str, torch.Tensor] = {}
    if EXTRA_FILE in info["files"]:
        extra, header = _read_tensors(path / EXTRA_FILE, device)
        extra = _restore_aliases(path / EXTRA_FILE, extra, header)
    return Checkpoint(path, info["step"], model_state, full, optimizer_state, extra)


TensorSpec = tuple[tuple[int, ...], str]  # (shape, safetensors dtype such as "F32")
_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def spec_of(tensor: torch.Tensor) -> TensorSpec:
    """The (shape, dtype) a tensor has in a safetensors header."""
    return tuple(tensor.shape), _ST_DTYPES.get(tensor.dtype, str(tensor.dtype))


def tensor_specs(path: Path) -> dict[str, TensorSpec]:
    """Name -> (shape, dtype) of a checkpoint's model tensors, tied aliases included, read
    from the safetensors header without loading any tensor data."""
    file = Path(path) / MODEL_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            specs = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for bad bytes
        raise CheckpointError(f"{file}: cannot read safetensors header ({type(err).__name__}: {err})") from None
    for alias, canonical in _parse_header(file, header, "aliases").items():
        if canonical not in specs:
            raise CheckpointError(f"{file}: alias {alias!r} points at missing tensor {canonical!r}")
        specs[alias] = specs[canonical]
    return specs


def check_fits(expected: Mapping[str, TensorSpec], found: Mapping[str, TensorSpec], where: str) -> None:
    """Raise CheckpointError listing missing/unexpected names, shape and dtype mismatches."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{k}: checkpoint {found[k][0]} {found[k][1]} vs model {expected[k][0]} {expected[k][1]}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k][0]) != tuple(expected[k][0]) or found[k][1] != expected[k][1]
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}")
        if mismatched:
            parts.append(f"mismatches [{'; '.join(mismatched[:10])}]")
        raise CheckpointError(f"{where}: does not fit the model: {', '.join(parts)}")


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


def _read_tensors(file: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(file), framework="pt", device=device) as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for bad bytes
        raise CheckpointError(f"{file}: cannot read safetensors ({type(err).__name__}: {err})") from None
    return tensors, header


def _parse_header(file: Path, header: dict[str, str], key: str) -> Any:
    try:
        return json.loads(header[key])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{file}: header entry {key!r} missing or invalid ({err})") from None


def _restore_aliases(file: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> dict[str, torch.Tensor]:
    aliases = _parse_header(file, header, "aliases")
    for alias, canonical in aliases.items():
        if canonical not in tensors:
            raise CheckpointError(f"{file}: alias {alias!r} points at missing tensor {canonical!r}")
        tensors[alias] = tensors[canonical]
    return tensors


# --------------------------------------------------------------------------- filesystem


def _step_dir_name(step: int) -> str:
    return f"step_{step}"


def _step_dirs(root: Path) -> Iterable[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return found


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    others = sorted((s, p) for s, p in _step_dirs(root) if p != keep)
    doomed = others[: max(0, len(others) - (keep_last - 1))]
    for _, path in doomed:
        # Rename first so an interrupted delete never leaves a half-deleted step_N that
        # could look like a checkpoint.
        trash = root / f"{_TMP_PREFIX}delete-{path.name}-{secrets.token_hex(4)}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    # os.replace cannot overwrite a non-empty directory; re-saving a step moves the old
    # one aside first.
    if final.exists():
        trash = final.parent / f"{_TMP_PREFIX}old-{final.name}-{secrets.token_hex(4)}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _write_text_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
    try:
        _write_text_synced(tmp, json.dumps(data, indent=2))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable; not every platform can open a directory (Windows).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""A stage's Ray task, wherever it lands: its inputs go with it, its outputs come back.

DVC runs on the driver, so what a stage produces must end up in the driver's scratch
directory whatever node ran the task, and what MLflow records (read from the published
outputs) is then what the task produced. Paths in a task's arguments are marked:

- ``In(path)``: a file or folder the task reads (``only``: just these members of it;
  ``beside``: files next to a file that go with it, e.g. a program's kernel list);
- ``Out(path)``: the folder the task writes (the stage's scratch directory).

With the embedded Ray the task shares the driver's disk and gets the paths as they are.
On a cluster each ``In`` is packed into a tar that travels with the task through Ray's
object store and is unpacked on the task's node; each ``Out`` becomes a fresh folder on
that node, packed after the task and unpacked into the driver's path. Fine for what a
stage task moves (tokenizers, mixtures, models of on-device size); training data at
scale goes through the run storage instead (storage.py).
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.train.config import RayConfig


@dataclass(frozen=True)
class In:
    path: Path
    only: tuple[str, ...] | None = None  # members (relative paths) to send; None: all
    beside: tuple[str, ...] = ()  # files in the same folder that go with a file (a program's kernel list)


@dataclass(frozen=True)
class Out:
    path: Path


@dataclass(frozen=True)
class _Packed:
    """An In or Out as it crosses to another node: a tar (or nothing, for an Out)."""

    kind: str  # "in" or "out"
    name: str  # the path's final component, kept so file names stay as the task expects
    data: bytes = b""


def _pack(path: Path, only: tuple[str, ...] | None = None, beside: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        if only is None:
            tar.add(path, arcname=path.name)
            for name in beside:
                tar.add(path.parent / name, arcname=name)
        else:
            for member in only:
                tar.add(path / member, arcname=f"{path.name}/{member}")
    return buffer.getvalue()


def _unpack(data: bytes, into: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(into, filter="data")  # no links out, no absolute paths, no devices


def _map(value: Any, leaf: Callable[[Any], Any], depth: int = 0) -> Any:
    """``value`` with ``leaf`` applied to every In/Out/_Packed in it, also inside lists,
    tuples and dict values (e.g. ``{configured path: In(file)}``). ``value`` is the
    argument list or keyword dict: an Out deeper than its items is refused (ValueError),
    since only an argument's own Out comes back."""
    if isinstance(value, (In, Out, _Packed)):
        if depth > 1 and isinstance(value, Out):
            raise ValueError(f"Out({value.path}) inside a container: pass it as an argument of its own")
        return leaf(value)
    if isinstance(value, dict):
        return {k: _map(v, leaf, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, leaf, depth + 1) for v in value)
    return value


def _plain(value: Any) -> Any:
    return _map(value, lambda v: v.path)


def _ship_one(value: In | Out) -> _Packed:
    if isinstance(value, Out):
        return _Packed("out", value.path.name)
    if value.only is not None and not value.path.is_dir():
        raise ValueError(f"In({value.path}, only=...): only a folder has members")
    if value.beside and not value.path.is_file():
        raise ValueError(f"In({value.path}, beside=...): only a file has files beside it")
    return _Packed("in", value.path.name, _pack(value.path, value.only, value.beside))


def _ship(value: Any) -> Any:
    return _map(value, _ship_one)


def _outs(args: list, kwargs: dict) -> dict[int | str, Any]:
    """The top-level Out arguments (or their packed forms), keyed by position or name."""
    keyed = {**dict(enumerate(args)), **kwargs}
    return {key: v for key, v in keyed.items() if isinstance(v, Out) or (isinstance(v, _Packed) and v.kind == "out")}


def _on_node(fn: Callable, args: list, kwargs: dict) -> tuple[Any, dict[int | str, bytes]]:
    """Runs on the task's node: unpack the inputs, call ``fn``, pack the outputs.

    Returns ``fn``'s result and a tar of each top-level Out, keyed like :func:`_outs`."""
    root = Path(tempfile.mkdtemp(prefix="stage-task-"))
    made: dict[int, Path] = {}  # id of a packed Out -> its folder here

    def local(value: _Packed) -> Path:
        folder = root / f"{value.kind}{len(list(root.iterdir()))}"
        folder.mkdir()
        if value.kind == "out":
            made[id(value)] = folder / value.name
            made[id(value)].mkdir()
            return made[id(value)]
        if value.data:
            _unpack(value.data, folder)
        return folder / value.name

    try:
        result = fn(*_map(list(args), local), **_map(dict(kwargs), local))
        return result, {key: _pack(made[id(v)]) for key, v in _outs(args, kwargs).items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def call(cfg: RayConfig, fn: Callable, *args: Any, num_cpus: int = 1, resources: dict | None = None, **kwargs: Any):
    """``fn(*args, **kwargs)`` as one Ray task (Ray started); returns its result.

    On a cluster (``ray.address``), ``In`` arguments (also inside lists, tuples and dict
    values) and top-level ``Out`` arguments are shipped as described in the module doc;
    every ``Out`` folder on the driver receives what the task wrote there (each entry
    replacing the one of its name; normally the folder is an empty scratch directory)."""
    import ray

    from pipeline.runner.cluster import on_cluster

    options = {"num_cpus": num_cpus, "resources": resources or {}}
    task = ray.remote(**options)
    if not on_cluster(cfg):
        return ray.get(task(fn).remote(*_plain(list(args)), **_plain(dict(kwargs))))
    result, packed = ray.get(task(_on_node).remote(fn, _ship(list(args)), _ship(dict(kwargs))))
    for key, out in _outs(list(args), kwargs).items():
        _land(packed[key], out.path)
    return result


def _land(data: bytes, path: Path) -> None:
    """Unpack an Out's tar into the driver's folder ``path``: each top-level entry the
    task wrote replaces the one of the same name; the folder's other entries stay."""
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}-returned-") as landing:
        _unpack(data, Path(landing))
        for item in (Path(landing) / path.name).iterdir():
            target = path / item.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            item.rename(target)

"""A stage's Ray task, wherever it lands: its inputs go with it, its outputs come back.

DVC runs on the driver, so what a stage produces must end up in the driver's scratch
directory whatever node ran the task, and what MLflow records (read from the published
outputs) is then what the task produced. Paths in a task's arguments are marked:

- ``In(path)``: a file or folder the task reads (``only``: just these members of it);
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


@dataclass(frozen=True)
class Out:
    path: Path


@dataclass(frozen=True)
class _Packed:
    """An In or Out as it crosses to another node: a tar (or nothing, for an Out)."""

    kind: str  # "in" or "out"
    name: str  # the path's final component, kept so file names stay as the task expects
    data: bytes = b""


def _pack(path: Path, only: tuple[str, ...] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        if only is None:
            tar.add(path, arcname=path.name)
        else:
            for member in only:
                tar.add(path / member, arcname=f"{path.name}/{member}")
    return buffer.getvalue()


def _unpack(data: bytes, into: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(into, filter="data")  # no links out, no absolute paths, no devices


def _plain(value: Any) -> Any:
    return value.path if isinstance(value, (In, Out)) else value


def _ship(value: Any) -> Any:
    if isinstance(value, In):
        if value.only is not None and not value.path.is_dir():
            raise ValueError(f"In({value.path}, only=...): only a folder has members")
        return _Packed("in", value.path.name, _pack(value.path, value.only))
    if isinstance(value, Out):
        return _Packed("out", value.path.name)
    return value


def _on_node(fn: Callable, args: list, kwargs: dict) -> tuple[Any, list[bytes]]:
    """Runs on the task's node: unpack the inputs, call ``fn``, pack the outputs."""
    root = Path(tempfile.mkdtemp(prefix="stage-task-"))
    outs: list[Path] = []

    def local(value: Any, i: int) -> Any:
        if not isinstance(value, _Packed):
            return value
        folder = root / f"{value.kind}{i}"
        folder.mkdir()
        if value.kind == "out":
            outs.append(folder / value.name)
            outs[-1].mkdir()
            return outs[-1]
        if value.data:
            _unpack(value.data, folder)
        return folder / value.name

    try:
        local_args = [local(v, i) for i, v in enumerate(args)]
        local_kwargs = {k: local(v, len(args) + i) for i, (k, v) in enumerate(kwargs.items())}
        result = fn(*local_args, **local_kwargs)
        return result, [_pack(out) for out in outs]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def call(cfg: RayConfig, fn: Callable, *args: Any, num_cpus: int = 1, resources: dict | None = None, **kwargs: Any):
    """``fn(*args, **kwargs)`` as one Ray task (Ray started); returns its result.

    On a cluster (``ray.address``), ``In``/``Out`` arguments are shipped as described in
    the module doc; every ``Out`` folder on the driver receives what the task wrote there
    (merged into what it holds, normally an empty scratch directory)."""
    import ray

    from pipeline.runner.cluster import on_cluster

    options = {"num_cpus": num_cpus, "resources": resources or {}}
    if not on_cluster(cfg):
        task = ray.remote(**options)(fn)
        return ray.get(task.remote(*[_plain(v) for v in args], **{k: _plain(v) for k, v in kwargs.items()}))
    outs = [v.path for v in [*args, *kwargs.values()] if isinstance(v, Out)]
    result, packed = ray.get(
        ray.remote(**options)(_on_node).remote(fn, [_ship(v) for v in args], {k: _ship(v) for k, v in kwargs.items()})
    )
    for path, data in zip(outs, packed, strict=True):
        _land(data, path)
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

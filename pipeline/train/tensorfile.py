"""Tensors to and from safetensors files, the checkpoint's building block: exact aliases
(tied weights) stored once and named in the header, header-only specs, durable writes.

safetensors refuses tensors that share storage. Exact aliases (same storage, offset,
shape, stride, e.g. tied embedding/output weights) are saved once under their first
name and the other names are recorded in the file's header, so the header alone lists
every name (the input checks read it without building a model) and loading puts the
*same* tensor back under every alias. Partial overlaps (views) are cloned.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class CheckpointError(RuntimeError):
    """A checkpoint (or one of its tensor files) is missing, incomplete, corrupt or does
    not fit the model."""


def dedupe_aliases(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=header)
    fsync_file(path)


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
    """Name -> (shape, dtype) of a safetensors file's tensors, aliases included, read from
    its header without loading any tensor data."""
    file = Path(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            specs = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for bad bytes
        raise CheckpointError(f"{file}: cannot read safetensors header ({type(err).__name__}: {err})") from None
    for alias, canonical in parse_header(file, header, "aliases").items():
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


def read_tensors(file: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(file), framework="pt", device=device) as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for bad bytes
        raise CheckpointError(f"{file}: cannot read safetensors ({type(err).__name__}: {err})") from None
    return tensors, header


def parse_header(file: Path, header: dict[str, str], key: str) -> Any:
    try:
        return json.loads(header[key])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{file}: header entry {key!r} missing or invalid ({err})") from None


def restore_aliases(file: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> dict[str, torch.Tensor]:
    aliases = parse_header(file, header, "aliases")
    for alias, canonical in aliases.items():
        if canonical not in tensors:
            raise CheckpointError(f"{file}: alias {alias!r} points at missing tensor {canonical!r}")
        tensors[alias] = tensors[canonical]
    return tensors


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    # Makes the rename durable; not every platform can open a directory (Windows).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

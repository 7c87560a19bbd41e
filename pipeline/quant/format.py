"""The converted model on disk: one safetensors file, no pickle.

Layout of ``model.safetensors``:
  <name>.values   INT4 (and 2- or 3-bit) weights packed two per byte (uint8; low nibble =
                  even index of the last dim), or INT8 weights as int8
  <name>.scale    FP32 scale per group of the last dim
  <name>          every other tensor as it is in the model: FP32 router weights,
                  norms, and the routers' expert biases (routing state, not weights)
Header metadata: format name and version, the model and quant configs, and per
quantized weight its bits, group and unpacked shape.

Its weight bytes (all but the expert biases) equal
``int4_weight_bytes(cfg, group, scale_bytes=4, norm_bytes=4)`` for per-group INT4 with
an INT4 embedding (``embedding_bits=8`` for an INT8 one): the FP32 scales torchao's QAT
produces and FP32 norms. The on-device estimate (bf16 scales and norms) is the
function's default.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.configbase import from_dict
from pipeline.model import ModelConfig, Transformer
from pipeline.quant.config import QuantConfig
from pipeline.quant.convert import QuantizedWeight, convert, stored_bits
from pipeline.quant.coverage import quantized_weights
from pipeline.quant.fake import prepare

FORMAT = "mobilemoe-quantized"
VERSION = "1"
ROUTING_STATE = "expert_bias_E"


class QuantizedFormatError(ValueError):
    """A quantized model file is missing, damaged or of another format."""


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], last dim even -> uint8 with half the last dim."""
    nibbles = (values.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 -> int8 values in [-8, 7]."""
    lo, hi = (packed & 0xF).to(torch.int8), (packed >> 4).to(torch.int8)
    both = torch.stack((lo, hi), dim=-1).flatten(-2)
    return torch.where(both >= 8, both - 16, both)


def _sort_metadata(path: Path) -> None:
    """Rewrite the file's header with its ``__metadata__`` keys in sorted order, in place.

    safetensors writes the metadata map in hash order, which differs from process to
    process: the same model would give different bytes on every run, and DVC would see a
    new output each time. The header keeps its length (same JSON, other order; the
    padding to 8 bytes stays), so the tensor data does not move."""
    import struct

    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw = f.read(length)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > length:  # cannot happen for a reordering; never corrupt the file
            raise QuantizedFormatError(f"{path}: the reordered header is longer than the original")
        f.seek(8)
        f.write(text + b" " * (length - len(text)))


def save_quantized(model: Transformer, q: QuantConfig, path: Path) -> None:
    """Write a converted ``model`` to ``path`` atomically (temp file + rename)."""
    qweights = quantized_weights(model)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for name, w in qweights.items():
        tensors[f"{name}.values"] = pack_int4(w.values) if stored_bits(w.bits) == 4 else w.values
        tensors[f"{name}.scale"] = w.scale
        layout[name] = {"bits": w.bits, "group": w.group, "shape": list(w.values.shape)}
    for name, t in model.state_dict().items():
        if name not in qweights and isinstance(t, torch.Tensor) and type(t) is torch.Tensor:
            tensors[name] = t.detach()
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": json.dumps(asdict(model.cfg)),
        "quant": json.dumps(asdict(q)),
        "weights": json.dumps(layout),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        _sort_metadata(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates it private; the model is an ordinary output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise QuantizedFormatError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own types for bad bytes
        raise QuantizedFormatError(f"{path}: cannot read safetensors ({type(err).__name__}: {err})") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise QuantizedFormatError(f"{path}: not a {FORMAT} v{VERSION} file (header {header.get('format')!r})")
    return tensors, header


def weight_bytes(path: Path) -> int:
    """Bytes of the weights stored in ``path`` (everything but the routing state)."""
    tensors, _ = _read(path)
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if not k.endswith(ROUTING_STATE))


def load_quantized(path: Path) -> tuple[Transformer, QuantConfig]:
    """Rebuild the converted model saved by :func:`save_quantized` (eval mode)."""
    tensors, header = _read(path)
    cfg = from_dict(ModelConfig, json.loads(header["model"]), "model")
    q = from_dict(QuantConfig, json.loads(header["quant"]), "quant")
    layout = json.loads(header["weights"])
    model = convert(prepare(Transformer(cfg), q), q)  # the structure; values come next
    targets = quantized_weights(model)
    if set(targets) != set(layout):
        raise QuantizedFormatError(
            f"{path}: quantized weights {sorted(set(layout) ^ set(targets))} do not match the model"
        )
    for name, spec in layout.items():
        values = tensors.pop(f"{name}.values")
        values = unpack_int4(values) if stored_bits(spec["bits"]) == 4 else values
        lo, hi = -(2 ** (spec["bits"] - 1)), 2 ** (spec["bits"] - 1) - 1
        if values.numel() and not (lo <= int(values.min()) and int(values.max()) <= hi):
            # a nibble holds [-8, 7]: a 2- or 3-bit weight outside its range is damage
            raise QuantizedFormatError(
                f"{path}: {name} holds values in [{int(values.min())}, {int(values.max())}], "
                f"outside the {spec['bits']}-bit range [{lo}, {hi}]"
            )
        loaded = QuantizedWeight(
            values.reshape(spec["shape"]), tensors.pop(f"{name}.scale"), spec["bits"], spec["group"]
        )
        _assign(model, name, loaded, targets[name])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in targets]
    if missing or unexpected:
        raise QuantizedFormatError(f"{path}: missing tensors {missing}, unexpected {unexpected}")
    return model.eval(), q


def _assign(model: Transformer, name: str, loaded: QuantizedWeight, target: QuantizedWeight) -> None:
    if loaded.values.shape != target.values.shape or loaded.scale.shape != target.scale.shape:
        raise QuantizedFormatError(f"{name}: stored shape {tuple(loaded.values.shape)} does not fit the model")
    # Linear weights are torchao tensors whose qdata/scale are the target's tensors:
    # copying in place updates them; expert and embedding weights are plain holders.
    target.values.copy_(loaded.values)
    target.scale.copy_(loaded.scale)

"""Checks of a stage's inputs: present, intact, and fitting, before any work starts.

Each input is named by the config key that points at it, so an error says what to fix.
Checks read headers and hashes, never whole tensors: a mixture's arrays are opened
memory-mapped, a checkpoint's tensor names, shapes and dtypes come from its
safetensors header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.data.base import DataError
from pipeline.data.mixing import MixtureConfig, load_split
from pipeline.data.tokenizer import Tokenizer
from pipeline.hashing import sha256_file
from pipeline.model import ModelConfig
from pipeline.runner.errors import StageInputError
from pipeline.train.checkpoint import (
    CheckpointError,
    check_fits,
    problem,
    spec_of,
    tensor_specs,
    verify_checkpoint,
)


class Input(Protocol):
    key: str  # the config key that names this input

    def check(self) -> Any:
        """Raise StageInputError naming ``key`` and the problem; return what was read."""


@dataclass
class MixtureInput:
    """A mixture directory written by the mix stage."""

    key: str
    path: Path
    seq_len: int
    needs_conversations: bool = False

    def check(self) -> dict:
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise StageInputError(
                f"{self.key}: missing upstream output {manifest_path} (run the mix stage first: make mix)"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
        except (ValueError, KeyError) as err:
            raise StageInputError(f"{self.key}: {manifest_path} is not a mixture manifest ({err})") from None
        for name, info in files.items():
            file = self.path / name
            if not file.is_file():
                raise StageInputError(f"{self.key}: missing upstream output {file} (listed in {manifest_path})")
            if sha256_file(file) != info["sha256"]:
                raise StageInputError(
                    f"{self.key}: {file} does not match the sha256 in its manifest (damaged "
                    f"or replaced; rebuild it with make mix)"
                )
        for split in ("train", "val"):
            try:
                tokens, mask = load_split(self.path, split)
            except (FileNotFoundError, DataError) as err:
                raise StageInputError(f"{self.key}: {err}") from None
            if len(tokens) < self.seq_len + 1:
                raise StageInputError(
                    f"{self.key}: the {split} split of {self.path} has {len(tokens)} tokens, "
                    f"fewer than one window of seq_len+1={self.seq_len + 1}"
                )
            # Without targets there is nothing to learn or to score: training would report
            # a loss of 0.0 as if it were a result.
            if not mask.any():
                raise StageInputError(
                    f"{self.key}: the {split} split of {self.path} has no target tokens (every loss-mask entry is 0)"
                )
        if self.needs_conversations and not (self.path / "val_conversations.jsonl").is_file():
            raise StageInputError(
                f"{self.key}: sample prompts need held-out conversations "
                f"({self.path / 'val_conversations.jsonl'}), which only a chat mixture has"
            )
        return manifest


@dataclass
class TokenizerInput:
    key: str
    path: Path
    vocab_size: int

    def check(self) -> Tokenizer:
        if not self.path.is_file():
            raise StageInputError(f"{self.key}: missing tokenizer {self.path} (run the mix stage first: make mix)")
        try:
            tokenizer = Tokenizer.load(self.path)
        except Exception as err:  # noqa: BLE001 - any parse failure means a damaged file
            raise StageInputError(
                f"{self.key}: cannot read tokenizer {self.path}: {type(err).__name__}: {err}"
            ) from None
        if tokenizer.vocab_size > self.vocab_size:
            raise StageInputError(
                f"{self.key}: tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={self.vocab_size}"
            )
        return tokenizer


@dataclass
class CheckpointInput:
    """A complete checkpoint directory, intact, for exactly this model."""

    key: str
    path: Path
    model: ModelConfig

    def check(self) -> Path:
        path = self.path
        if not path.exists():
            raise StageInputError(f"{self.key}: no checkpoint at {path} (has the upstream stage run?)")
        why = problem(path)
        if why is not None:  # there is something, but not a checkpoint this code reads: say why
            raise StageInputError(f"{self.key}: {path}: {why}")
        try:
            verify_checkpoint(path)
            meta = json.loads((path / "meta.json").read_text())
            found = tensor_specs(path)
        except (CheckpointError, ValueError) as err:
            raise StageInputError(f"{self.key}: {err}") from None
        from dataclasses import asdict

        # A stage inherits the architecture of the checkpoint it starts from; a config
        # that disagrees is a mistake to report, not to paper over.
        ours, theirs = asdict(self.model), meta.get("model") or {}
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if diff:
            raise StageInputError(
                f"{self.key}: model config differs from {path} in {', '.join('model.' + k for k in diff)}"
            )
        try:
            check_fits(expected_specs(self.model), found, str(path))
        except CheckpointError as err:
            raise StageInputError(f"{self.key}: {err}") from None
        return path


def expected_specs(model: ModelConfig) -> dict:
    """Name -> (shape, dtype) of the model's state dict, from a module built on the meta
    device (no memory, no initialisation)."""
    import torch

    from pipeline.model import Transformer

    with torch.device("meta"):
        module = Transformer(model)
    return {name: spec_of(t) for name, t in module.state_dict().items()}


@dataclass
class SourcesInput:
    """The mix stage's inputs: every non-optional source of every mixture can be read."""

    key: str
    mixtures: dict[str, MixtureConfig]
    vocab_size: int

    def check(self) -> None:
        from pipeline.data.build import validate_all
        from pipeline.data.sources import iter_documents

        try:
            validate_all(self.mixtures, self.vocab_size)
        except DataError as err:
            raise StageInputError(f"{self.key}.{err}") from None
        # Read the first document of every required source, so an empty one fails in
        # seconds, naming the source, before anything is rebuilt.
        for role, cfg in self.mixtures.items():
            for i, src in enumerate(cfg.sources):
                if src.weight <= 0 or src.optional:
                    continue
                where = f"{self.key}.{role}.sources[{i}] ({src.name!r}, kind {src.kind})"
                try:
                    first = next((d for d in iter_documents(src) if d.text.strip()), None)
                except DataError as err:
                    raise StageInputError(f"{where}: {err}") from None
                if first is None:
                    raise StageInputError(f"{where} yielded no documents")


@dataclass
class QuantizedModelInput:
    """A converted INT4 model file (QAT's ``quantized/model.safetensors``) for exactly
    this model config; the file's header is read, not its tensors."""

    key: str
    path: Path
    model: ModelConfig

    def check(self) -> Path:
        from dataclasses import asdict

        from safetensors import safe_open

        from pipeline.quant.format import FORMAT, VERSION

        if self.path.is_dir() or (self.path.parent / "meta.json").exists():
            raise StageInputError(
                f"{self.key}: {self.path} is a training checkpoint, not a converted INT4 model "
                "(give QAT's quantized/model.safetensors)"
            )
        if not self.path.exists():
            raise StageInputError(f"{self.key}: {self.path} does not exist (has the qat stage run?)")
        try:  # the header only, not the tensors
            with safe_open(str(self.path), framework="pt") as f:
                header = f.metadata() or {}
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types for bad bytes
            raise StageInputError(f"{self.key}: {self.path}: cannot read safetensors ({err})") from None
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise StageInputError(
                f"{self.key}: {self.path} is not a converted {FORMAT} v{VERSION} model "
                "(a fake-quant or full-precision checkpoint?); the INT4 export needs QAT's quantized output"
            )
        from pipeline.quant.config import DEPLOYED_SCHEME

        scheme = json.loads(header.get("quant", "{}")).get("scheme")
        if scheme != DEPLOYED_SCHEME:
            raise StageInputError(
                f"{self.key}: {self.path} is {scheme}, a QAT study scheme; the program holds "
                f"{DEPLOYED_SCHEME} (XNNPACK's INT4 GEMMs): export a model quantized with "
                f"stage.qat.scheme={DEPLOYED_SCHEME}"
            )
        theirs = json.loads(header["model"])
        ours = asdict(self.model)
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if diff:
            raise StageInputError(
                f"{self.key}: model config differs from {self.path} in {', '.join('model.' + k for k in diff)}"
            )
        return self.path


@dataclass
class HFMappableInput:
    """The architecture can be written exactly as a transformers model (names the knob)."""

    key: str
    model: ModelConfig

    def check(self) -> str:
        from pipeline.export.hf import HFMappingError, hf_config

        try:
            config = hf_config(self.model, 0, 0, 0)
        except HFMappingError as err:
            raise StageInputError(f"{self.key}: {err}") from None
        return config.architectures[0]


@dataclass
class ProgramInput:
    """An ExecuTorch program (.pte) that loads, has the methods a runner needs, and holds
    ``positions`` (the longest prompt plus the decoded tokens) in its KV cache."""

    key: str
    path: Path
    positions: int
    vocab_size: int
    lengths_key: str = "stage.profile.prompt_lengths"  # the key that sets ``positions``

    def check(self) -> Path:
        from pipeline.profile.programs import ProgramError, load_program

        try:
            program = load_program(self.path)
        except ProgramError as err:
            raise StageInputError(f"{self.key}: {err}") from None
        if program.metadata["vocab_size"] != self.vocab_size:
            raise StageInputError(
                f"{self.key}: {self.path} has vocab_size {program.metadata['vocab_size']}, the model config "
                f"{self.vocab_size} (a program of another model?)"
            )
        if self.positions > program.max_context:
            raise StageInputError(
                f"{self.lengths_key}: the longest run needs {self.positions} positions, but {self.path} "
                f"holds {program.max_context} (its max_context; raise stage.export.max_context or shorten the prompts)"
            )
        return self.path


@dataclass
class ThreadsInput:
    """A thread count the embedded Ray's machine can run without oversubscription (a
    cluster's device node checks its own cores when the task starts there)."""

    key: str
    threads: int
    on_cluster: bool

    def check(self) -> int:
        from pipeline.runner.cluster import local_cpus

        if not self.on_cluster and self.threads > local_cpus():
            raise StageInputError(
                f"{self.key}: {self.threads} threads requested, but this machine has {local_cpus()} usable cores"
            )
        return self.threads


@dataclass
class SuiteInput:
    """An evaluation suite directory (the evalsets stage's), every file intact and well
    formed, and every request short enough for the model (and the .pte, if any)."""

    key: str
    path: Path
    tokenizer: Path
    max_len: int  # the model's context (model.max_seq_len)
    program: Path | None = None  # a .pte that runs the generative tasks (checked before this)

    def check(self) -> dict:
        from pipeline.eval.suites import load_suite
        from pipeline.eval.tasks import TaskFileError

        try:
            suite = load_suite(self.path)
        except TaskFileError as err:
            raise StageInputError(f"{self.key}: {err}") from None
        tok = Tokenizer.load(self.tokenizer)
        program_context = None
        if self.program is not None:
            from pipeline.profile.programs import load_program

            program_context = load_program(self.program).max_context
        for spec, items in suite.values():
            for item in items:
                longest = _request_tokens(spec, item, tok)
                limit = self.max_len
                if spec.kind == "generate" and program_context is not None:
                    limit = min(limit, program_context)
                if longest > limit:
                    raise StageInputError(
                        f"{self.key}: item {item.id!r} of task {spec.name!r} needs {longest} positions, more than "
                        f"the {'program' if limit != self.max_len else 'model'}'s {limit} "
                        "(shorten the task's items, or lower its max_tokens)"
                    )
        return suite


def _request_tokens(spec, item, tok: Tokenizer) -> int:
    """Positions the longest request of ``item`` needs, BOS (and chat markers) included."""
    if spec.kind == "rolling":
        return 1 + len(tok.encode(item.text))
    if spec.kind == "multiple_choice":
        return 1 + max(len(tok.encode(item.context + c)) for c in item.choices)
    markers = 3 if spec.chat else 0  # <|user|> ... <|end|> <|assistant|>
    return 1 + markers + len(tok.encode(item.context)) + spec.max_tokens - 1  # the last token is not fed back


@dataclass
class LoweringMemoryInput:
    """The export's lowering fits this machine's memory (estimated from the config,
    :mod:`pipeline.export.budget`); checked on the driver, where the embedded Ray runs it."""

    key: str  # the stage's config block
    model: ModelConfig
    moe: str
    max_context: int
    on_cluster: bool = False

    def check(self) -> int:
        from pipeline.export.budget import GIB, available_bytes, lowering_peak_bytes

        need = lowering_peak_bytes(self.model, self.moe, self.max_context)
        have = available_bytes()
        if not self.on_cluster and need > have:
            fused = lowering_peak_bytes(self.model, "fused", self.max_context)
            hint = f"; {self.key}.moe=fused needs about {fused / GIB:.1f} GiB" if self.moe != "fused" else ""
            raise StageInputError(
                f"{self.key}: lowering model={self.model.name} ({self.model.n_layers} layers, vocab "
                f"{self.model.vocab_size}) with {self.key}.moe={self.moe} and {self.key}.max_context="
                f"{self.max_context} needs about {need / GIB:.1f} GiB; this machine has {have / GIB:.1f} GiB "
                f"available{hint}"
            )
        return need


@dataclass
class CompilerInput:
    """``torch.compile``'s compilers, found the way torch finds them: on CPU inductor's
    C++ compiler (``$CXX``, else ``g++``: ``torch._inductor.cpp_builder``'s own search),
    on CUDA Triton's C compiler for its launcher (``$CC``, else ``cc``/``gcc``/``clang``).
    Without one the first training step would fail after the model and data were
    loaded. Checked on the driver; on a cluster each node needs the same."""

    key: str
    gpu: bool = False

    def check(self) -> str:
        import os
        import shutil

        if self.gpu:
            names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
            found = next((path for name in names if (path := shutil.which(name))), None)
            if found is None:
                raise StageInputError(
                    f"{self.key}: torch.compile on CUDA (Triton) needs a C compiler and none of {', '.join(names)} "
                    f"is on PATH; install one or set {self.key}=false"
                )
            return found
        from torch._inductor import config, exc
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            return get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            tried = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
            names = ", ".join(str(c) for c in tried if c)
            raise StageInputError(
                f"{self.key}: torch.compile on CPU needs a C++ compiler and inductor found none ({names}, as "
                f"$CXX or on PATH); install one or set {self.key}=false"
            ) from None


@dataclass
class StorageInput:
    """The run storage (``ray.storage_path``) a training job checkpoints into and stages
    its inputs through: writable from here, checked with a probe object before Ray
    starts. For an object store the credentials come from this process's environment
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, or the instance's role,
    as the AWS SDK finds them); every node of a cluster needs the same."""

    key: str
    storage: Any  # a runner.storage.RunStorage

    def check(self) -> Any:
        from pipeline.runner.storage import redacted

        try:
            self.storage.check_writable()
        except (OSError, ValueError) as err:  # pyarrow: OSError from the store, ArrowInvalid for the URI
            hint = ""
            if self.storage.uri.startswith("s3://"):
                hint = (
                    "; check the bucket's name and the credentials in this environment (AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), which every node of a cluster needs as well"
                )
            message = f"cannot write to {self.storage.uri}: {str(err).splitlines()[0]}"
            raise StageInputError(f"{self.key}: {redacted(message)}{hint}") from None
        return self.storage


def storage_inputs(recipe: Any) -> list[StorageInput]:
    """The run storage as an input of a training stage, where it is a URI (an object store,
    or ``file://`` on a shared mount); a plain path is a folder Ray Train creates."""
    from pipeline.runner import cluster
    from pipeline.runner.storage import is_uri

    storage = cluster.storage(recipe.ray)
    return [StorageInput("ray.storage_path", storage)] if is_uri(storage.uri) else []

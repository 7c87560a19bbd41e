"""The whole recipe's config: composed by Hydra from ``conf/``, validated here.

``conf/`` is the one source of truth. ``params.yaml`` is its composed default (what
``dvc repro`` runs); ``python -m pipeline.recipe params`` regenerates it. Every stage
validates the *whole* recipe config first, so an unknown key or a bad value anywhere
fails in well under a second, naming the key, before Ray starts. Every check that needs
only the config lives here (not in a stage), so ``make`` can run them all before DVC.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.configbase import ConfigError, from_dict, require
from pipeline.data.mixing import MixtureConfig
from pipeline.eval.config import EvalStageConfig, SuiteConfig
from pipeline.export.config import ExportStageConfig
from pipeline.model.config import ModelConfig
from pipeline.profile.config import ProfileStageConfig
from pipeline.quant.config import QuantConfig
from pipeline.report.config import ReportStageConfig
from pipeline.tracking import TrackingConfig
from pipeline.train.config import QATStageConfig, RayConfig, TrainStageConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
TRAIN_STAGES = ("pretrain", "midtrain", "sft")


def repo_path(path: str | Path) -> Path:
    """A config path as an absolute path: relative paths are relative to the repo root,
    wherever the stage was started from."""
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


@dataclass
class DataConfig:
    out_dir: str  # the mix stage's output directory
    pretrain: MixtureConfig
    midtrain: MixtureConfig
    sft: MixtureConfig


@dataclass
class StagesConfig:
    pretrain: TrainStageConfig
    midtrain: TrainStageConfig
    sft: TrainStageConfig
    qat: QATStageConfig
    export: ExportStageConfig
    profile: ProfileStageConfig
    evalsets: SuiteConfig
    eval: EvalStageConfig
    report: ReportStageConfig


@dataclass
class RecipeConfig:
    model: ModelConfig
    data: DataConfig
    stage: StagesConfig
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        from pipeline.data.build import EXPECTED_KIND
        from pipeline.data.tokenizer import MIN_VOCAB

        require(
            MIN_VOCAB <= self.model.vocab_size < 2**32,
            "model.vocab_size",
            f"must be in [{MIN_VOCAB}, 2**32) for the byte-level tokenizer, got {self.model.vocab_size}",
        )
        for name, kind in EXPECTED_KIND.items():
            got = getattr(self.data, name).kind
            require(got == kind, f"data.{name}.kind", f"must be {kind!r} for the {name} mixture, got {got!r}")
        # Whole groups on every quantized weight: names the tensor a group size misses.
        self.stage.qat.quant().check_fits(self.model, key="stage.qat.group_size")
        for name in (*TRAIN_STAGES, "qat"):
            s: TrainStageConfig = getattr(self.stage, name)
            require(
                s.seq_len <= self.model.max_seq_len,
                f"stage.{name}.seq_len",
                f"{s.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
            )
        require(
            self.stage.export.max_context <= self.model.max_seq_len,
            "stage.export.max_context",
            f"{self.stage.export.max_context} exceeds model.max_seq_len={self.model.max_seq_len}",
        )
        profile = self.stage.profile
        require(
            profile.longest_run <= self.stage.export.max_context,
            "stage.profile.prompt_lengths",
            f"a {max(profile.prompt_lengths)}-token prompt plus stage.profile.decode_tokens={profile.decode_tokens} "
            f"needs {profile.longest_run} positions, more than "
            f"stage.export.max_context={self.stage.export.max_context}",
        )
        # After QAT's own group check: the default interpolates QAT's group, whose error
        # should name stage.qat.group_size.
        require(
            profile.group_size % 32 == 0,
            "stage.profile.group_size",
            f"XNNPACK's INT4 GEMM needs a multiple of 32, got {profile.group_size}",
        )
        if self.model.moe is not None:
            from pipeline.model.twins import dense_twin

            for baseline in profile.baselines:  # a twin the INT4 groups cannot tile fails here, not after export
                twin = dense_twin(self.model, baseline.removeprefix("dense_"), multiple=profile.group_size)
                QuantConfig(group_size=profile.group_size).check_fits(twin, key="stage.profile.group_size")


def to_container(cfg: Any) -> dict:
    """A plain dict from an OmegaConf node (interpolations resolved) or a mapping."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def validate(cfg: Any) -> RecipeConfig:
    """Build the typed recipe config, raising ConfigError naming the first bad key."""
    return from_dict(RecipeConfig, to_container(cfg))


def compose(overrides: Sequence[str] = ()) -> dict:
    """Compose ``conf/config.yaml`` with Hydra overrides into a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def load_params(path: str | Path) -> dict:
    """Read a composed params file (``params.yaml``) as a plain dict."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file {path} does not exist (run `make params`)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"params file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"params file {path} does not hold a mapping")
    return data


BODY_HASH = "# sha256 of the body below: "


def dump_params(data: dict) -> str:
    """params.yaml text: a header (with the body's hash, to tell a generated file from a
    hand-edited one) and the composed config."""
    import hashlib

    import yaml

    body = yaml.safe_dump(data, sort_keys=False)
    header = (
        "# Generated from conf/ by `make params` (python -m pipeline.recipe params).\n"
        "# Do not edit: change conf/ and regenerate; a test fails when they drift.\n"
        f"{BODY_HASH}{hashlib.sha256(body.encode()).hexdigest()}\n"
    )
    return header + body


def hand_edits(path: Path, composed: dict) -> list[str] | None:
    """Dotted keys where ``path`` (an existing params file) differs from ``composed``, if
    the file was edited after it was generated (its body no longer matches the hash in
    its header); None when the file is as generated (or absent), so regenerating it
    loses nothing."""
    import hashlib

    import yaml

    if not path.is_file():
        return None
    text = path.read_text()
    recorded = next((line[len(BODY_HASH) :].strip() for line in text.splitlines() if line.startswith(BODY_HASH)), "")
    body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
    if recorded == hashlib.sha256(body.encode()).hexdigest():
        return None
    try:
        edited = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        return [f"(the file does not parse as YAML: {str(err).splitlines()[0]})"]
    return _differing_keys(edited, composed) or None


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys: list[str] = []
        for key in list(a) + [k for k in b if k not in a]:
            keys += _differing_keys(a.get(key, _MISSING), b.get(key, _MISSING), f"{prefix}{key}.")
        return keys
    return [] if a == b else [prefix.rstrip(".")]


_MISSING = object()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.recipe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("params", help="print the composed config (params.yaml) for overrides")
    p.add_argument("overrides", nargs="*")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.add_argument("--force", action="store_true", help="overwrite an output that was edited by hand")
    args = parser.parse_args(argv)
    data = compose(args.overrides)
    try:
        validate(data)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    text = dump_params(data)
    if not args.output:
        sys.stdout.write(text)
        return 0
    output = Path(args.output)
    edits = None if args.force else hand_edits(output, data)
    if edits:
        # conf/ is the source of truth, but a hand edit is not thrown away in silence
        # (nor ignored in silence, as `dvc repro` would do with a key no stage reads).
        print(
            f"{output} was edited by hand; it differs from conf/ at: {', '.join(edits[:10])}. Move the change "
            f"into conf/ (the source), or discard it with `make params FORCE=1`.",
            file=sys.stderr,
        )
        return 2
    output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Read a recipe run's published output files into plain dataclasses.

Nothing here formats or draws. Every reader takes a path and returns a dataclass, or
``None`` when the file that marks the stage as done is absent ("stage has not run").
A file that exists but cannot be read (bad JSON, a missing field, a non-number where a
number belongs) raises :class:`ReportInputError` whose message starts with its path.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.configbase import from_dict
from pipeline.model import accounting
from pipeline.model.config import ModelConfig

MIXTURES = ("pretrain", "midtrain", "sft")
TRAINING = ("pretrain", "midtrain", "sft", "qat")
# outputs/qat/metrics.json: (key, label, reference key whose loss the gap is measured from)
QUANT_ROWS = (
    ("sft_fp32", "SFT model, FP32", None),
    ("ptq", "SFT model, PTQ INT4 (8da4w, group-wise scales)", "sft_fp32"),
    ("ptq_per_channel", "SFT model, PTQ INT4 (per-channel scales)", "sft_fp32"),
    ("qat_int4", "QAT model, converted to INT4", "sft_fp32"),
    ("control_fp32", "control: FP32, same steps and data as QAT", None),
    ("control_ptq", "control, PTQ INT4", "control_fp32"),
)
PROFILE_PLOTS = ("throughput", "expert_load")
NUMBER = (int, float)


class ReportInputError(ValueError):
    """A published output file is malformed. The message starts with the file's path."""


@dataclass
class ReportInputs:
    """Where a recipe run's outputs live. A stage whose key is absent, or whose files
    are absent, is reported as missing."""

    model: dict  # the recipe's `model` config as a plain dict (params.yaml `model:`)
    mixtures: dict[str, Path]  # 'pretrain'|'midtrain'|'sft' -> mixture dir holding manifest.json
    train_dirs: dict[str, Path]  # 'pretrain'|'midtrain'|'sft'|'qat' -> stage out_dir
    eval_dirs: dict[str, Path]  # 'pretrain'|'midtrain'|'sft'|'qat' -> outputs/eval/<stage>
    export_dir: Path | None  # outputs/export
    profile_dir: Path | None  # outputs/profile
    runs: dict[str, dict]  # stage name -> {"run_id": str, "url": str} (MLflow; may be empty)
    run_order: tuple[str, ...] = ()  # stage names in recipe order (the rest follow by name)
    title: str = "MobileMoE recipe report"
    scaling_dir: Path | None = None  # outputs/scaling (make scaling-fit, make plan, make closed-loop)
    scaling_plan: str = "planned_tiny"  # the plan under scaling_dir/plan/ the report shows


@dataclass
class ModelSummary:
    """The model's size and cost, from :mod:`pipeline.model.accounting` alone."""

    name: str
    config: dict  # the model dict as given
    params_total: int
    params_active: int
    params_embedding: int
    flops_per_token_prefill: float
    flops_per_token_decode: float
    context: int  # the context the FLOPs are counted at (the model's max_seq_len)
    int4_weight_bytes: int
    kv_cache_bytes_per_token: int


@dataclass
class SourceShare:
    """One source of a mixture: its domain and what it contributed to the train split."""

    name: str
    domain: str
    tokens: int  # train split
    target_tokens: int
    bytes: int
    weight_requested: float | None


@dataclass
class Mixture:
    """A mixture's achieved composition (train split), from its manifest.json."""

    kind: str
    sources: list[SourceShare]
    tokens: int
    target_tokens: int
    bytes: int
    skipped: list[str] = field(default_factory=list)  # "name: reason"

    def domain_tokens(self) -> dict[str, int]:
        """Train tokens per domain, domains in first-seen order."""
        out: dict[str, int] = {}
        for s in self.sources:
            out[s.domain] = out.get(s.domain, 0) + s.tokens
        return out


@dataclass
class TrainingRun:
    """A training stage's final numbers, loss curve and the final checkpoint's expert load."""

    metrics: dict[str, float]  # step, tokens_seen, train_loss, val_loss, val_bpb (those present)
    train_curve: list[tuple[int, float]]  # (step, train loss)
    val_curve: list[tuple[int, float]]  # (step, val loss)
    expert_load_LE: list[list[float]] | None  # tokens routed to each expert, per layer
    checkpoint: str | None  # e.g. "step_360"


@dataclass
class TaskScore:
    """One task's result in an eval metrics.json (``centred``: (score - chance) / (1 - chance))."""

    metric: str
    score: float | None
    chance: float | None
    centred: float | None
    n: int | None
    chat: bool
    stderr: float | None = None  # of a 0/1 score over its n items (absent in older files)
    exact_match: float | None = None  # a format task's answers that are also right

    @property
    def lower_is_better(self) -> bool:
        return self.metric in ("bits_per_byte", "bpb", "perplexity", "loss")


@dataclass
class EvalResult:
    """One stage's outputs/eval/<stage>/metrics.json."""

    centred_acc: float | None
    instruct: float | None
    form: str  # "fp32" | "int4"
    tasks: dict[str, TaskScore]
    pte_tasks: dict[str, TaskScore] | None


@dataclass
class QuantRow:
    """One model of the QAT stage's comparison."""

    key: str
    label: str
    loss: float | None  # SFT val loss, nats per assistant token
    bpb: float | None  # bits per byte on the pre-training val text
    reference: str | None  # key of the FP32 row the gap is measured from
    gap: float | None  # loss - reference loss


@dataclass
class QuantComparison:
    """outputs/qat/metrics.json: FP32, PTQ and QAT models on the same held-out data."""

    rows: list[QuantRow]
    recovered_vs_sft: float | None
    recovered_vs_control: float | None
    weight_bytes: int | None  # the converted file (FP32 scales, FP32 norms)


@dataclass
class ExportSummary:
    """outputs/export/metrics.json: file sizes and which checks passed."""

    bytes: dict[str, int]  # "pte", "pt2", "hf", ...
    checks_passed: list[str]
    checks_failed: list[str]
    max_context: int | None


@dataclass
class ProfileSummary:
    """Headline numbers of outputs/profile/metrics.json and its plot files."""

    speedup: dict[str, dict[str, dict[str, float]]]  # baseline -> phase -> prompt length -> x
    moe: dict[str, dict[str, float]]  # "ttft_ms"|"prefill_tok_s"|"decode_tok_s" -> length -> value
    bandwidth_gb_s: float | None
    peak_rss_mib: float | None
    expert_load: dict | None
    plots: dict[str, Path]  # "throughput"|"expert_load" -> png (those that exist)


@dataclass
class RunRef:
    """A stage's MLflow run: its ID and its page in the tracking UI."""

    run_id: str
    url: str


@dataclass
class ReportData:
    """Everything the report shows. ``None`` (or an absent key) marks a stage that has not run."""

    title: str
    model: ModelSummary
    mixtures: dict[str, Mixture | None]
    training: dict[str, TrainingRun | None]
    evals: dict[str, EvalResult | None]
    quant: QuantComparison | None
    export: ExportSummary | None
    profile: ProfileSummary | None
    runs: dict[str, RunRef]
    scaling: Any = None  # pipeline.report.scaling.ScalingSummary; None: no fit

    def missing(self) -> list[str]:
        """The parts whose stage has not run, e.g. ``["eval/midtrain", "profile"]``."""
        out = [f"mix/{k}" for k, v in self.mixtures.items() if v is None]
        out += [f"train/{k}" for k, v in self.training.items() if v is None]
        out += [f"eval/{k}" for k, v in self.evals.items() if v is None]
        # (the FP/PTQ/QAT comparison comes from train/qat's own metrics.json)
        parts = (("export", self.export), ("profile", self.profile), ("scaling", self.scaling))
        return out + [name for name, v in parts if v is None]


# -- readers ------------------------------------------------------------------------


def read_json(path: Path) -> Any | None:
    """The parsed JSON at ``path``; None when the file does not exist.

    Raises ReportInputError naming ``path`` when it is not valid JSON."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ReportInputError(f"{path}: not valid JSON ({err})") from None


def _get(data: Any, key: str, path: Path | str, kind: type | tuple[type, ...] = object, default: Any = ...) -> Any:
    """``data[key]`` checked to be a ``kind`` (``NUMBER``: an int or float, not a bool);
    ``default`` when absent (or null, when ``default`` is None); ReportInputError naming
    ``path`` otherwise."""
    if not isinstance(data, dict):
        raise ReportInputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    if key not in data:
        if default is not ...:
            return default
        raise ReportInputError(f"{path}: missing field {key!r}")
    value = data[key]
    if value is None and default is None:
        return None
    bad_number = kind is NUMBER and isinstance(value, bool)
    if bad_number or not isinstance(value, kind):
        what = "a number" if kind is NUMBER else getattr(kind, "__name__", str(kind))
        raise ReportInputError(f"{path}: field {key!r} must be {what}, got {value!r}")
    return value


def _num(data: Any, key: str, path: Path | str) -> float | None:
    """An optional number field (absent or null -> None)."""
    return _get(data, key, path, NUMBER, default=None)


def model_summary(model: dict) -> ModelSummary:
    """The model's parameter counts, FLOPs per token (at its max_seq_len) and INT4 weight
    bytes, all from :mod:`pipeline.model.accounting`. Raises ConfigError on a bad dict."""
    cfg = from_dict(ModelConfig, model, "model")
    s = accounting.summary(cfg, context=cfg.max_seq_len)
    return ModelSummary(
        name=cfg.name,
        config=dict(model),
        params_total=int(s["params_total"]),
        params_active=int(s["params_active"]),
        params_embedding=int(s["params_embedding"]),
        flops_per_token_prefill=float(s["flops_per_token_prefill"]),
        flops_per_token_decode=float(s["flops_per_token_decode"]),
        context=int(s["context"]),
        int4_weight_bytes=int(s["int4_weight_bytes"]),
        kv_cache_bytes_per_token=int(s["kv_cache_bytes_per_token"]),
    )


def read_mixture(mix_dir: Path) -> Mixture | None:
    """The train split's tokens, target tokens and bytes per source of ``mix_dir/manifest.json``;
    None when it does not exist."""
    path = Path(mix_dir) / "manifest.json"
    manifest = read_json(path)
    if manifest is None:
        return None
    sources = []
    for name, src in _get(manifest, "sources", path, dict).items():
        where = f"{path} sources.{name}"
        sources.append(
            SourceShare(
                name=name,
                domain=str(_get(src, "domain", where, str)),
                tokens=int(_get(_get(src, "tokens", where, dict), "train", where, NUMBER)),
                target_tokens=int(_get(_get(src, "target_tokens", where, dict, {}), "train", where, NUMBER, 0)),
                bytes=int(_get(_get(src, "bytes", where, dict, {}), "train", where, NUMBER, 0)),
                weight_requested=_num(src, "weight_requested", where),
            )
        )
    train = _get(_get(manifest, "totals", path, dict, {}), "train", path, dict, {})
    skipped = [
        f"{_get(s, 'name', path, str)}: {_get(s, 'reason', path, str, '')}"
        for s in _get(manifest, "skipped_sources", path, list, [])
    ]
    return Mixture(
        kind=str(_get(manifest, "kind", path, str, "")),
        sources=sources,
        tokens=int(_get(train, "tokens", path, NUMBER, sum(s.tokens for s in sources))),
        target_tokens=int(_get(train, "target_tokens", path, NUMBER, sum(s.target_tokens for s in sources))),
        bytes=int(_get(train, "bytes", path, NUMBER, sum(s.bytes for s in sources))),
        skipped=skipped,
    )


def read_loss_csv(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, val) curves of a loss.csv with columns step,train_loss,val_loss (empty cells
    skipped); two empty lists when it does not exist."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return [], []
    train: list[tuple[int, float]] = []
    val: list[tuple[int, float]] = []
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or "step" not in reader.fieldnames:
        raise ReportInputError(f"{path}: expected a header with column 'step', got {reader.fieldnames}")
    for line, row in enumerate(reader, start=2):
        try:
            step = int(float(row["step"]))
            for column, curve in (("train_loss", train), ("val_loss", val)):
                cell = (row.get(column) or "").strip()
                if cell:
                    curve.append((step, float(cell)))
        except (TypeError, ValueError) as err:
            raise ReportInputError(f"{path}:{line}: {err}") from None
    return train, val


def read_expert_load(model_dir: Path) -> tuple[str | None, list[list[float]] | None]:
    """(``step_<N>``, tokens per [layer][expert]) of the final checkpoint ``model_dir``;
    (None, None) when there is none, (name, None) when it records no load."""
    meta_path = Path(model_dir) / "meta.json"
    meta = read_json(meta_path)
    if meta is None:
        return None, None
    name = f"step_{int(_num(meta, 'step', meta_path) or 0)}"
    load = _get(meta, "expert_load", meta_path, (str, list), default=None)
    if isinstance(load, str):  # stored JSON-encoded (a string metric) by some writers
        try:
            load = json.loads(load)
        except json.JSONDecodeError as err:
            raise ReportInputError(f"{meta_path}: field 'expert_load' is not valid JSON ({err})") from None
    if load is None or load == []:
        return name, None
    ok = isinstance(load, list) and all(isinstance(r, list) and len(r) == len(load[0]) for r in load)
    ok = ok and all(isinstance(v, NUMBER) and not isinstance(v, bool) for r in load for v in r)
    if not ok:
        raise ReportInputError(f"{meta_path}: field 'expert_load' must be a [layers][experts] list of numbers")
    return name, [[float(v) for v in row] for row in load]


def read_training(out_dir: Path) -> TrainingRun | None:
    """A training stage's metrics.json, loss.csv and final checkpoint's expert load; None
    when metrics.json does not exist. QAT's own training numbers carry a ``qat_train_``
    prefix in its metrics.json; they are read without it."""
    out_dir = Path(out_dir)
    path = out_dir / "metrics.json"
    raw = read_json(path)
    if raw is None:
        return None
    metrics: dict[str, float] = {}
    for key in ("step", "tokens_seen", "train_loss", "val_loss", "val_bpb"):
        for name in (key, f"qat_train_{key}"):
            value = _num(raw, name, path)
            if value is not None:
                metrics[key] = value
                break
    train, val = read_loss_csv(out_dir / "loss.csv")
    checkpoint, load = read_expert_load(out_dir / "model")
    return TrainingRun(metrics, train, val, load, checkpoint)


def _tasks(raw: Any, path: Path, key: str) -> dict[str, TaskScore]:
    tasks = {}
    for name, t in _get(raw, key, path, dict).items():
        where = f"{path} {key}.{name}"
        n = _num(t, "n", where)
        tasks[name] = TaskScore(
            metric=str(_get(t, "metric", where, str)),
            score=_num(t, "score", where),
            chance=_num(t, "chance", where),
            centred=_num(t, "centred", where),
            n=None if n is None else int(n),
            chat=bool(_get(t, "chat", where, bool, False)),
            stderr=_num(t, "stderr", where),
            exact_match=_num(t, "exact_match", where),
        )
    return tasks


def read_eval(eval_dir: Path) -> EvalResult | None:
    """outputs/eval/<stage>/metrics.json; None when it does not exist."""
    path = Path(eval_dir) / "metrics.json"
    raw = read_json(path)
    if raw is None:
        return None
    return EvalResult(
        centred_acc=_num(raw, "centred_acc", path),
        instruct=_num(raw, "instruct", path),
        form=str(_get(raw, "form", path, str, "fp32")),
        tasks=_tasks(raw, path, "tasks"),
        pte_tasks=_tasks(raw, path, "pte_tasks") if raw.get("pte_tasks") else None,
    )


def read_quant(qat_dir: Path) -> QuantComparison | None:
    """FP32 vs PTQ vs QAT losses of outputs/qat/metrics.json; None when it does not exist.
    Rows whose model was not evaluated (no control) are left out."""
    path = Path(qat_dir) / "metrics.json"
    raw = read_json(path)
    if raw is None:
        return None
    rows = []
    for key, label, ref in QUANT_ROWS:
        loss, bpb = _num(raw, f"loss_{key}", path), _num(raw, f"bpb_{key}", path)
        if loss is None and bpb is None:
            continue
        ref_loss = _num(raw, f"loss_{ref}", path) if ref else None
        gap = loss - ref_loss if loss is not None and ref_loss is not None else None
        rows.append(QuantRow(key, label, loss, bpb, ref, gap))
    weight_bytes = _num(raw, "weight_bytes", path)
    return QuantComparison(
        rows=rows,
        recovered_vs_sft=_num(raw, "recovered_vs_sft", path),
        recovered_vs_control=_num(raw, "recovered_vs_control", path),
        weight_bytes=None if weight_bytes is None else int(weight_bytes),
    )


def read_export(export_dir: Path) -> ExportSummary | None:
    """File sizes and check outcomes of outputs/export/metrics.json; None when absent."""
    path = Path(export_dir) / "metrics.json"
    raw = read_json(path)
    if raw is None:
        return None
    checks = _get(raw, "checks", path, dict, {})
    passed = sorted(k for k, v in checks.items() if isinstance(v, dict) and v.get("passed") is True)
    failed = sorted(k for k in checks if k not in passed)
    sizes = {k: int(v) for k, v in _get(raw, "bytes", path, dict, {}).items() if isinstance(v, NUMBER)}
    max_context = _num(raw, "max_context", path)
    return ExportSummary(sizes, passed, failed, None if max_context is None else int(max_context))


def _numbers_at_depth(tree: dict, depth: int, where: str) -> dict:
    """``tree`` checked to be ``depth`` levels of objects with numbers as leaves."""
    for key, value in tree.items():
        if depth > 1:
            if not isinstance(value, dict):
                raise ReportInputError(f"{where}.{key}: expected a JSON object, got {value!r}")
            _numbers_at_depth(value, depth - 1, f"{where}.{key}")
        elif isinstance(value, bool) or not isinstance(value, NUMBER):
            raise ReportInputError(f"{where}.{key}: must be a number, got {value!r}")
    return tree


def read_profile(profile_dir: Path) -> ProfileSummary | None:
    """Speed-ups, the MoE's TTFT / prefill / decode numbers and the plot files of
    outputs/profile; None when its metrics.json does not exist."""
    profile_dir = Path(profile_dir)
    path = profile_dir / "metrics.json"
    raw = read_json(path)
    if raw is None:
        return None
    plots = {name: profile_dir / "plots" / f"{name}.png" for name in PROFILE_PLOTS}
    return ProfileSummary(
        speedup=_numbers_at_depth(_get(raw, "speedup", path, dict, {}), 3, f"{path} speedup"),
        moe=_numbers_at_depth(_get(raw, "moe", path, dict, {}), 2, f"{path} moe"),
        bandwidth_gb_s=_num(raw, "bandwidth_gb_s", path),
        peak_rss_mib=_num(raw, "moe_peak_rss_mib", path),
        expert_load=_get(raw, "expert_load", path, dict, None),
        plots={k: p for k, p in plots.items() if p.is_file()},
    )


def _ordered(keys, order) -> list[str]:
    return [k for k in order if k in keys] + sorted(k for k in keys if k not in order)


def read_scaling(scaling_dir: Path, plan: str):
    """:func:`pipeline.report.scaling.read_scaling` (imported here: that module reads
    files with this one's helpers)."""
    from pipeline.report.scaling import read_scaling as read

    return read(scaling_dir, plan)


def collect(inputs: ReportInputs) -> ReportData:
    """Read every stage's outputs named by ``inputs`` into a :class:`ReportData`.

    A stage absent from ``inputs`` or whose files are absent is ``None`` (missing).
    Raises ReportInputError (naming the file) on a malformed file and ConfigError on a
    bad model dict."""

    def each(dirs: dict[str, Path], names: tuple[str, ...], read):
        return {
            k: (read(dirs[k]) if dirs.get(k) is not None else None) for k in _ordered(set(dirs) | set(names), names)
        }

    runs = {}
    for stage in _ordered(inputs.runs, inputs.run_order):
        ref = inputs.runs[stage]
        runs[stage] = RunRef(run_id=str(ref.get("run_id", "")), url=str(ref.get("url", "") or ""))
    return ReportData(
        title=inputs.title,
        model=model_summary(inputs.model),
        mixtures=each(inputs.mixtures, MIXTURES, read_mixture),
        training=each(inputs.train_dirs, TRAINING, read_training),
        evals=each(inputs.eval_dirs, TRAINING, read_eval),
        quant=read_quant(inputs.train_dirs["qat"]) if inputs.train_dirs.get("qat") is not None else None,
        export=read_export(inputs.export_dir) if inputs.export_dir is not None else None,
        profile=read_profile(inputs.profile_dir) if inputs.profile_dir is not None else None,
        runs=runs,
        scaling=read_scaling(inputs.scaling_dir, inputs.scaling_plan) if inputs.scaling_dir is not None else None,
    )

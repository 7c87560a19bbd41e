"""ReportData turned into what the markdown template lays out: tables of formatted cells
and short sentences. Text that comes from the input files is escaped here, so a cell
is markdown and the template only joins cells."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline.profile.report import LABELS as PROFILE_LABELS
from pipeline.profile.report import expert_load_sentence, verdict
from pipeline.report.collect import EvalResult, ModelSummary, ReportData, TaskScore
from pipeline.report.fmt import DASH, count, nbytes, pct, sig, signed, times

MISSING = "missing (stage has not run)"
_SHORT = {"sft_fp32": "SFT FP32", "control_fp32": "control FP32"}
_SPECIAL = re.compile(r"([\\`*_\[\]<>|#!])")


def esc(text: object) -> str:
    """``text`` as literal markdown inside a table cell (no emphasis, links, HTML or pipes)."""
    return _SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


@dataclass
class Table:
    """A markdown table: ``align`` holds "l" or "r" per column; cells are markdown."""

    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    align: list[str] | None = None

    def __post_init__(self) -> None:
        if self.align is None:
            self.align = ["l"] + ["r"] * (len(self.header) - 1)


def _exact(n: int) -> str:
    return f"{count(n)} ({n:,})"


def model_table(m: ModelSummary, data: ReportData) -> Table:
    """Size and cost of the model (accounting), with the exported file next to them."""
    c = m.config
    moe = c.get("moe") or {}
    t = Table(["quantity", "value"], align=["l", "l"])
    shape = (
        f"{c.get('n_layers')} layers, d_model {c.get('d_model')}, {c.get('n_heads')} heads ({c.get('n_kv_heads')} KV)"
    )
    t.rows.append(["model", f"{esc(m.name)}: {shape}, vocab {c.get('vocab_size')}"])
    if moe:
        shared = f" + {moe.get('num_shared_experts', 0)} shared" if moe.get("num_shared_experts") else ""
        t.rows.append(["experts per MoE layer", f"{moe.get('num_experts')} routed (top-{moe.get('top_k')}){shared}"])
    t.rows.append(["parameters, total", _exact(m.params_total)])
    share = m.params_active / m.params_total if m.params_total else None
    t.rows.append(["parameters, active per token", f"{_exact(m.params_active)}, {pct(share)} of total"])
    t.rows.append(["parameters, embedding", _exact(m.params_embedding)])
    t.rows.append([f"FLOPs / token, prefill ({m.context}-token prompt)", count(m.flops_per_token_prefill)])
    t.rows.append([f"FLOPs / token, decode ({m.context} tokens cached)", count(m.flops_per_token_decode)])
    t.rows.append(
        [
            "INT4 weight bytes (8da4w, group 32, bf16 scales; estimate)",
            f"{nbytes(m.int4_weight_bytes)} ({m.int4_weight_bytes:,} B)",
        ]
    )
    t.rows.append(["KV cache / token (bf16)", nbytes(m.kv_cache_bytes_per_token)])
    if data.quant is not None and data.quant.weight_bytes is not None:
        t.rows.append(["QAT converted file (FP32 scales and norms)", nbytes(data.quant.weight_bytes)])
    if data.export is None:
        t.rows.append(["exported .pte", f"export: {MISSING}"])
    else:
        e = data.export
        t.rows.append(["exported .pte", nbytes(e.bytes.get("pte"))])
        checks = f"{len(e.checks_passed)} of {len(e.checks_passed) + len(e.checks_failed)} passed"
        if e.checks_failed:
            checks += "; failed: " + ", ".join(esc(k) for k in e.checks_failed)
        t.rows.append(["export checks", checks])
    return t


def _share(part: float, whole: float) -> str:
    return pct(part / whole) if whole else DASH


def domain_table(data: ReportData) -> Table:
    """Share of each mixture's train tokens per domain (domains as rows, mixtures as columns)."""
    mixes = data.mixtures
    t = Table(["domain"] + [esc(k) if v is not None else f"{esc(k)} (missing)" for k, v in mixes.items()])
    domains: list[str] = []
    for mix in mixes.values():
        for d in mix.domain_tokens() if mix is not None else ():
            if d not in domains:
                domains.append(d)
    for d in domains:
        row = [esc(d)]
        for mix in mixes.values():
            row.append(_share(mix.domain_tokens().get(d, 0), mix.tokens) if mix is not None else DASH)
        t.rows.append(row)
    t.rows.append(["**train tokens**"] + [count(m.tokens) if m is not None else MISSING for m in mixes.values()])
    return t


def source_tables(data: ReportData) -> dict[str, Table | None]:
    """Per mixture: each source's train tokens and its share of tokens, target tokens and
    bytes next to the weight the config asked for; None for a mixture that was not built."""
    out: dict[str, Table | None] = {}
    for stage, mix in data.mixtures.items():
        if mix is None:
            out[stage] = None
            continue
        t = Table(
            [
                "source",
                "domain",
                "train tokens",
                "share of tokens",
                "share of target tokens",
                "share of bytes",
                "weight requested",
            ]
        )
        t.align = ["l", "l", "r", "r", "r", "r", "r"]
        for s in mix.sources:
            t.rows.append(
                [
                    esc(s.name),
                    esc(s.domain),
                    count(s.tokens),
                    _share(s.tokens, mix.tokens),
                    _share(s.target_tokens, mix.target_tokens),
                    _share(s.bytes, mix.bytes),
                    pct(s.weight_requested),
                ]
            )
        out[stage] = t
    return out


def training_table(data: ReportData) -> Table:
    """The final step, tokens seen and losses of every training stage."""
    t = Table(["stage", "steps", "tokens seen", "train loss", "val loss", "val bits/byte (lower is better)"])
    for stage, run in data.training.items():
        if run is None:
            t.rows.append([esc(stage), MISSING, "", "", "", ""])
            continue
        m = run.metrics
        step = m.get("step")
        t.rows.append(
            [
                esc(stage),
                DASH if step is None else str(int(step)),
                count(m.get("tokens_seen")),
                sig(m.get("train_loss")),
                sig(m.get("val_loss")),
                sig(m.get("val_bpb")),
            ]
        )
    return t


def _task_label(name: str, task: TaskScore) -> str:
    label = f"{esc(name)} ({esc(task.metric)})"
    return label + ", lower is better" if task.lower_is_better else label


def eval_table(data: ReportData) -> Table:
    """Tasks x stages: each base task's score (± its standard error where the file has
    one), its chance level, the centred aggregate and the chat task's score; a ``.pte``
    column when the exported program was evaluated."""
    evals = data.evals
    present = [e for e in evals.values() if e is not None]
    header = ["task", "chance"]
    for stage, e in evals.items():
        header.append(f"{esc(stage)} (missing)" if e is None else f"{esc(stage)} ({esc(e.form.upper())})")
    pte = [(stage, e) for stage, e in evals.items() if e is not None and e.pte_tasks]
    header += [f"{esc(stage)} .pte (INT4, ExecuTorch)" for stage, _ in pte]
    t = Table(header)

    def first(name: str, chat: bool) -> TaskScore | None:
        for e in present:
            for tasks in (e.tasks, e.pte_tasks or {}):
                if name in tasks and tasks[name].chat == chat:
                    return tasks[name]
        return None

    def names(chat: bool) -> list[str]:
        out: list[str] = []
        for e in present:
            for tasks in (e.tasks, e.pte_tasks or {}):
                out += [k for k, v in tasks.items() if v.chat == chat and k not in out]
        return out

    def score(tasks: dict[str, TaskScore] | None, name: str) -> str:
        if not tasks or name not in tasks:
            return DASH
        task = tasks[name]
        # The standard error says which differences between stages are noise.
        return sig(task.score) + (f" ± {sig(task.stderr, 2)}" if task.stderr else "")

    for name in names(chat=False):
        task = first(name, chat=False)
        row = [_task_label(name, task), sig(task.chance)]
        row += [score(e.tasks, name) if e is not None else DASH for e in evals.values()]
        row += [score(e.pte_tasks, name) for _, e in pte]
        t.rows.append(row)
    agg = ["**centred accuracy** (mean over base tasks, (score - chance) / (1 - chance))", "0"]
    agg += [f"**{sig(e.centred_acc)}**" if e is not None else MISSING for e in evals.values()]
    agg += [DASH for _ in pte]
    t.rows.append(agg)
    chat = names(chat=True)
    label = ", ".join(_task_label(n, first(n, chat=True)) for n in chat) or "chat task"
    row = [f"**instruct** ({label})", sig(first(chat[0], chat=True).chance) if chat else DASH]
    row += [_instruct(e) for e in evals.values()]
    row += [score(e.pte_tasks, chat[0]) if chat else DASH for _, e in pte]
    t.rows.append(row)
    if chat and first(chat[0], chat=True).metric == "format":
        # The form can be learned without the answers: the share also right beside it.
        row = [f"**instruct** ({esc(chat[0])} ({esc('exact_match')}))", "0"]
        row += [_exact_match(e.tasks if e is not None else None, chat[0]) for e in evals.values()]
        row += [_exact_match(e.pte_tasks, chat[0]) for _, e in pte]
        t.rows.append(row)
    return t


def _exact_match(tasks: dict[str, TaskScore] | None, name: str) -> str:
    """A format task's exact match, ± its standard error (scoring.binomial_stderr)."""
    from pipeline.eval.scoring import binomial_stderr

    task = (tasks or {}).get(name)
    if task is None or task.exact_match is None:
        return DASH
    stderr = binomial_stderr(task.exact_match, task.n or 0)
    return sig(task.exact_match) + (f" ± {sig(stderr, 2)}" if stderr else "")


def _instruct(e: EvalResult | None) -> str:
    if e is None:
        return DASH
    return DASH if e.instruct is None else f"**{sig(e.instruct)}**"


def quant_table(data: ReportData) -> Table | None:
    """The SFT model in FP32 against its PTQ and QAT INT4 versions and the FP32 control."""
    q = data.quant
    if q is None:
        return None
    t = Table(
        [
            "model",
            "SFT val loss (nats / assistant token)",
            "gap (loss − its FP32 model)",
            "bits/byte, pre-training val text (lower is better)",
        ]
    )
    for r in q.rows:
        gap = DASH if r.reference is None else f"{signed(r.gap)} (vs {esc(_SHORT.get(r.reference, r.reference))})"
        # Five digits: the gaps between these models are in the third decimal.
        t.rows.append([esc(r.label), sig(r.loss, 5), gap, sig(r.bpb, 5)])
    return t


def quant_sentence(data: ReportData) -> str:
    """How much of the PTQ gap QAT recovers, against SFT and against the control."""
    q = data.quant
    if q is None:
        return ""
    parts = []
    if q.recovered_vs_sft is not None:
        parts.append(f"{pct(q.recovered_vs_sft)} of the PTQ loss gap against the SFT FP32 model")
    if q.recovered_vs_control is not None:
        parts.append(f"{pct(q.recovered_vs_control)} of the control's PTQ gap")
    return f"QAT recovers {' and '.join(parts)} (100%: INT4 as good as FP32)." if parts else ""


def _lengths(by_length: dict[str, float]) -> list[str]:
    return sorted(by_length, key=lambda n: int(n))


def profile_tables(data: ReportData) -> dict[str, Table]:
    """``moe``: TTFT, prefill and decode tok/s of the exported MoE per prompt length;
    ``speedup``: the MoE over each dense baseline, per phase and length (> 1: MoE faster)."""
    p = data.profile
    out: dict[str, Table | None] = {"moe": None, "speedup": None}  # absent parts render as nothing
    if p is None:
        return out
    if p.moe:
        t = Table(["prompt / context (tokens)", "TTFT ms", "prefill tok/s", "decode tok/s"])
        for n in _lengths(next(iter(p.moe.values()))):
            t.rows.append([n] + [sig(p.moe.get(k, {}).get(n)) for k in ("ttft_ms", "prefill_tok_s", "decode_tok_s")])
        out["moe"] = t
    if p.speedup:
        t = Table(["MoE over", "prompt / context", "prefill", "decode", "TTFT"])
        for baseline, s in p.speedup.items():
            for n in _lengths(s.get("decode") or next(iter(s.values()))):
                row = [esc(PROFILE_LABELS.get(baseline, baseline)), n]
                t.rows.append(row + [times(s.get(phase, {}).get(n)) for phase in ("prefill", "decode", "ttft")])
        out["speedup"] = t
    return out


def profile_sentences(data: ReportData) -> list[str]:
    """The profile report's own verdicts (one per baseline) and its expert-load sentence."""
    p = data.profile
    if p is None:
        return []
    out = []
    for baseline, s in p.speedup.items():
        if all(s.get(phase) for phase in ("prefill", "decode", "ttft")):
            out.append(f"**{esc(verdict(s, baseline))}**")
    if p.expert_load and {"decode_steps", "max_over_mean_load"} <= set(p.expert_load):
        out.append(esc(expert_load_sentence(p.expert_load, "eager replay of the longest-prompt runs' decode")))
    extra = []
    if p.peak_rss_mib is not None:
        extra.append(f"peak RSS of the MoE {sig(p.peak_rss_mib)} MiB")
    if p.bandwidth_gb_s is not None:
        extra.append(f"measured read bandwidth {sig(p.bandwidth_gb_s)} GB/s")
    if extra:
        text = "; ".join(extra)
        out.append(text[0].upper() + text[1:] + ".")
    return out


def expert_table(data: ReportData) -> Table:
    """Per stage: the final checkpoint, the busiest expert's load over the layer mean
    (worst layer) and the number of (layer, expert) pairs that got no token."""
    t = Table(["stage", "checkpoint", "busiest expert / layer mean (worst layer)", "idle (layer, expert) pairs"])
    t.align = ["l", "l", "r", "r"]
    for stage, run in data.training.items():
        if run is None:
            t.rows.append([esc(stage), MISSING, "", ""])
            continue
        load = run.expert_load_LE
        if not load:
            t.rows.append([esc(stage), esc(run.checkpoint or DASH), "no expert load recorded", ""])
            continue
        worst = max(max(row) / (sum(row) / len(row)) if sum(row) else 0.0 for row in load)
        idle = sum(v == 0 for row in load for v in row)
        t.rows.append([esc(stage), esc(run.checkpoint), f"{sig(worst)}x", f"{idle} of {len(load) * len(load[0])}"])
    return t


def runs_table(data: ReportData) -> Table | None:
    """Stage -> MLflow run ID, linked to the run's page in the tracking UI."""
    if not data.runs:
        return None
    t = Table(["stage", "MLflow run"], align=["l", "l"])
    for stage, ref in data.runs.items():
        run = f"`{ref.run_id}`" if "`" not in ref.run_id else esc(ref.run_id)
        if ref.url:
            run = f"[{run}](<{ref.url.replace('>', '%3E').replace(' ', '%20')}>)"
        t.rows.append([esc(stage), run])
    return t


def scaling_view(data: ReportData) -> dict | None:
    """The scaling section: sentences and the forms and comparison tables; None when
    no fit was published."""
    from pipeline.report import scaling

    if data.scaling is None:
        return None
    forms = scaling.forms_rows(data.scaling)
    return {
        "lines": scaling.scaling_lines(data.scaling),
        "forms": Table(
            [
                "form",
                "coefficients",
                "fit RMS / max",
                "leave-one-size-out",
                "largest budget from the smaller",
                "held out",
            ],
            forms,
        )
        if forms
        else None,
        "comparisons": Table(
            ["comparison (a vs b)", "at equal tokens", "at equal training seconds"],
            [[esc(label), *cells] for label, *cells in scaling.comparison_rows(data.scaling)],
        ),
    }

"""The recipe report: built from small synthetic copies of every stage's output files
(one eval and the profile left out, to be shown missing), checked for the numbers planted
in them, for the model package's own accounting, for a self-contained HTML file, and in
headless Chromium for images that load and tables that render."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from pipeline.configbase import from_dict
from pipeline.model.accounting import flops_per_token, int4_weight_bytes, param_counts
from pipeline.model.config import ModelConfig
from pipeline.report import ReportInputError, ReportInputs, collect, write_report
from pipeline.report.fmt import count, nbytes, pct, sig

MODEL = {
    "name": "micro",
    "vocab_size": 256,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 2,
    "n_kv_heads": 1,
    "head_dim": 16,
    "max_seq_len": 64,
    "moe": {"num_experts": 4, "top_k": 2, "expert_ffn_dim": 16, "num_shared_experts": 1, "shared_ffn_dim": 32},
}
STAGES = ("pretrain", "midtrain", "sft", "qat")
# Planted eval scores (three significant digits, so they print as written).
SCORES = {  # stage -> (continuation acc, heldout bits/byte, centred, instruct or None)
    "pretrain": (0.312, 2.41, 0.0712, None),
    "sft": (0.347, 2.17, 0.0961, 0.423),
    "qat": (0.338, 2.23, 0.0884, 0.417),
}
PTE_CONTINUATION, PTE_INSTRUCT = 0.329, 0.405
EXACT = {"sft": 0.25, "qat": 0.2, "pte": 0.15}  # the chat task's answers also right (of 100)
LOSS = {"sft_fp32": 3.0311, "ptq": 3.0393, "ptq_per_channel": 3.0446, "qat_int4": 3.0344, "control_fp32": 3.0348}
RUN_URL = "http://127.0.0.1:5000/#/experiments/1/runs/abc123"
# model, domains, 3 mixtures, training, eval, FP/PTQ/QAT, expert load, scaling forms and comparisons, runs
N_TABLES = 12  # (no profile)
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _manifest(sources: dict[str, tuple[str, int]]) -> dict:
    """A mixture manifest: source -> (domain, train tokens); target tokens are half and
    bytes four times the tokens."""
    entries = {
        name: {
            "domain": domain,
            "tokens": {"train": n, "val": n // 50},
            "target_tokens": {"train": n // 2, "val": n // 100},
            "bytes": {"train": 4 * n, "val": n // 10},
            "weight_requested": n / sum(t for _, t in sources.values()),
        }
        for name, (domain, n) in sources.items()
    }
    total = sum(n for _, n in sources.values())
    totals = {"train": {"tokens": total, "target_tokens": total // 2, "bytes": 4 * total, "documents": 10}}
    return {"kind": "text", "sources": entries, "totals": totals, "skipped_sources": []}


def _task(metric: str, score: float, chance: float | None, chat: bool = False) -> dict:
    centred = None if chance is None else score - chance
    return {"metric": metric, "score": score, "chance": chance, "centred": centred, "n": 100, "chat": chat}


def _eval(stage: str) -> dict:
    cont, bpb, centred, instruct = SCORES[stage]
    tasks = {
        "continuation": {**_task("acc", cont, 0.25), "acc_norm": cont - 0.01},
        "heldout_bpb": _task("bits_per_byte", bpb, None),
    }
    out = {"centred_acc": centred, "form": "int4" if stage == "qat" else "fp32", "tasks": tasks}
    if stage == "sft":
        tasks["continuation"]["stderr"] = 0.0464
    if instruct is not None:
        tasks["instruct"] = {**_task("format", instruct, 0.0, chat=True), "exact_match": EXACT[stage]}
        out["instruct"] = instruct
    if stage == "qat":
        out["pte_tasks"] = {
            "continuation": _task("acc", PTE_CONTINUATION, 0.25),
            "instruct": {**_task("format", PTE_INSTRUCT, 0.0, chat=True), "exact_match": EXACT["pte"]},
        }
    return out


def _training(out: Path, stage: str, steps: int, encode_load: bool) -> None:
    prefix = "qat_train_" if stage == "qat" else ""
    metrics = {"step": steps, "tokens_seen": steps * 1024, f"{prefix}train_loss": 2.5, f"{prefix}val_loss": 2.75}
    _write(out / "metrics.json", metrics)
    rows = ["step,train_loss,val_loss"] + [
        f"{s},{4.0 - s / steps},{'' if s % 20 else 4.2 - s / steps}" for s in range(10, steps + 1, 10)
    ]
    _write(out / "loss.csv", "\n".join(rows) + "\n")
    load_LE = [[30.0, 10.0, 20.0, 20.0], [25.0, 25.0, 25.0, 5.0]]
    meta = {"step": steps, "expert_load": json.dumps(load_LE) if encode_load else load_LE}
    _write(out / "model" / "meta.json", meta)


def make_inputs(root: Path, profile: bool = False) -> ReportInputs:
    """Synthetic outputs of a whole run under ``root``: no eval of midtrain, and no profile
    unless ``profile``."""
    mixtures = {
        "pretrain": {"py": ("code", 7500), "bible": ("literature", 2500)},
        "midtrain": {"py": ("code", 3000), "sums": ("math", 1000)},
        "sft": {"chat_math": ("math", 600), "chat_code": ("code", 400)},
    }
    for stage, sources in mixtures.items():
        _write(root / "mix" / stage / "manifest.json", _manifest(sources))
    for i, stage in enumerate(STAGES):
        _training(root / stage, stage, steps=40 + 20 * i, encode_load=(stage == "pretrain"))
    for stage in SCORES:
        _write(root / "eval" / stage / "metrics.json", _eval(stage))
    qat = json.loads((root / "qat" / "metrics.json").read_text())
    for name, loss in LOSS.items():
        qat[f"loss_{name}"], qat[f"bpb_{name}"] = loss, loss / 1.6
    qat.update(recovered_vs_sft=0.603, weight_bytes=123456)
    _write(root / "qat" / "metrics.json", qat)
    _write(root / "export" / "metrics.json", {"bytes": {"pte": 234567}, "checks": {"pte": {"passed": True}}})
    if profile:
        _profile(root / "profile")
    _scaling(root / "scaling")
    return ReportInputs(
        model=MODEL,
        mixtures={k: root / "mix" / k for k in mixtures},
        train_dirs={k: root / k for k in STAGES},
        eval_dirs={k: root / "eval" / k for k in STAGES},
        export_dir=root / "export",
        profile_dir=root / "profile",
        runs={"pretrain": {"run_id": "abc123", "url": RUN_URL}},
        scaling_dir=root / "scaling",
        scaling_plan="tiny_plan",
    )


def _scaling(out: Path) -> None:
    """Planted outputs of make scaling-fit, make plan and make closed-loop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def stats(count, rms, high):
        return {"count": count, "rms": rms, "max": high}

    fit = {
        "form_name": "interior",
        "sweep": "synth",
        "formula": "L = 1.7 + exp(3 - 0.32 ln N) + exp(5.7 - 0.3 ln D)",
        "fit_error": stats(64, 0.0123, 0.0456),
        "held_out_error": stats(8, 0.0211, 0.0322),
        "prediction_band": 0.0369,
        "held_out_inside_interval": 7,
        "seed_noise": {"cells": {"m-dense-600000": {}, "m-e16k4-600000": {}}, "pooled_sd_log_loss": 0.0171},
        "noise_weights": {
            "by": ["tokens", "routed"],
            "groups": [{"sd_log_loss": 0.0313}, {"sd_log_loss": 0.00213}, {"sd_log_loss": 0.0177}],
        },  # fmt: skip
        "form_selection": [
            {
                "form": "power",
                "coefficients": 8,
                "fit_error": stats(64, 0.0131, 0.05),
                "cv_error": stats(64, 0.0222, 0.061),
                "held_out_error": stats(8, 0.0293, 0.0359),
            },  # fmt: skip
            {
                "form": "interior",
                "coefficients": 10,
                "fit_error": stats(64, 0.0123, 0.0456),
                "cv_error": stats(64, 0.0196, 0.0596),
                "largest_budget_error": {**stats(16, 0.0258, 0.0424), "mean": -0.0202},
                "held_out_error": stats(8, 0.0211, 0.0322),
            },  # fmt: skip
        ],
        "comparisons": [
            {"label": "MoE vs dense", "a": "e16k4", "b": "dense", "mean_delta": 0.17, "a_better": 7, "cells": 9}
        ],  # fmt: skip
        "comparisons_at_equal_seconds": [
            {"label": "MoE vs dense", "a": "e16k4", "b": "dense", "mean_delta": -0.00123, "a_better": 3, "cells": 6}
        ],  # fmt: skip
    }
    _write(out / "fit.json", fit)
    plan = {"chosen": {"name": "l6_x", "pred_loss": 4.2538},
            "uncertainty": {"interval": [4.0799, 4.4399], "rows": [{"name": "l4_dense", "told_apart": False},
                                                                   {"name": "l2_y", "told_apart": True}],
                            "selection": {"optimism_mean": -0.00235, "corrected_pred_loss": 4.2638}}}  # fmt: skip
    _write(out / "plan" / "tiny_plan" / "plan.json", plan)
    closed = {"point": "l6-x-600000", "measured": 4.5374, "predicted": 4.2538, "interval": [4.0799, 4.4399],
              "inside": False, "miss": 0.02196}  # fmt: skip
    _write(out / "closed_loop.json", closed)
    control = {"point": "l3-y-600000", "measured": 4.3913, "predicted": 4.2218, "interval": [4.0738, 4.4042],
               "inside": True, "miss": 0.0}  # fmt: skip
    _write(out / "closed_loop_in_range.json", control)
    _write(out / "closed_loop_shared_in_range.json", {**control, "point": "l3-z-600000", "inside": False, "miss": 0.01})
    _write(out / "loop_earlier_l6_e3k1s1.json", {**control, "point": "l6-w-600000", "measured": 4.4020})
    _write(out / "loop_extrapolated_l6_e12k4s4.json", {**control, "point": "l6-v-600000", "measured": 4.4674})
    plt.imsave(out / "predicted_vs_measured.png", [[0.0, 1.0], [1.0, 0.0]])


def _profile(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.joinpath("plots").mkdir(parents=True)
    for name in ("throughput", "expert_load"):
        plt.imsave(out / "plots" / f"{name}.png", [[0.0, 1.0], [1.0, 0.0]])
    by_length = {"16": 0.5, "64": 0.75}
    speedup = {"dense_total": {"prefill": by_length, "decode": {"16": 1.25, "64": 1.5}, "ttft": by_length}}
    moe = {
        "ttft_ms": {"16": 5.42, "64": 13.1},
        "prefill_tok_s": {"16": 2950.0, "64": 4870.0},
        "decode_tok_s": by_length,
    }
    _write(out / "metrics.json", {"speedup": speedup, "moe": moe, "bandwidth_gb_s": 27.3, "moe_peak_rss_mib": 458.0})


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The report of the synthetic run, written once for the module."""
    root = tmp_path_factory.mktemp("run")
    data = collect(make_inputs(root))
    summary = write_report(data, root / "report")
    return {
        "data": data,
        "summary": summary,
        "md": Path(summary["markdown"]).read_text(),
        "html": Path(summary["html"]).read_text(),
    }


def _md_row(md: str, first_cell: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no markdown table row starting with {first_cell!r}")


def _html_row(html: str, first_cell: str) -> list[str]:
    for row in re.findall(r"<tr>(.*?)</tr>", html, re.S):
        cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no HTML table row starting with {first_cell!r}")


def test_model_summary_is_the_model_packages_accounting(built):
    cfg = from_dict(ModelConfig, MODEL, "model")
    counts = param_counts(cfg)
    m = built["data"].model
    assert (m.params_total, m.params_active) == (counts.total, counts.active)
    assert m.flops_per_token_prefill == flops_per_token(cfg, cfg.max_seq_len, "prefill")
    assert m.flops_per_token_decode == flops_per_token(cfg, cfg.max_seq_len, "decode")
    assert m.int4_weight_bytes == int4_weight_bytes(cfg)
    md = built["md"]
    assert _md_row(md, "parameters, total")[1] == f"{count(counts.total)} ({counts.total:,})"
    assert _md_row(md, "parameters, active per token")[1].startswith(f"{count(counts.active)} ({counts.active:,})")
    assert (
        f"({int4_weight_bytes(cfg):,} B)"
        in _md_row(md, "INT4 weight bytes (8da4w, group 32, bf16 scales; estimate)")[1]
    )
    assert _md_row(md, "FLOPs / token, prefill (64-token prompt)")[1] == count(flops_per_token(cfg, 64, "prefill"))
    assert _md_row(md, "exported .pte")[1] == nbytes(234567)


def test_eval_table_holds_the_planted_scores_in_markdown_and_html(built):
    md, html = built["md"], built["html"]
    header = _md_row(md, "task")
    assert header == [
        "task",
        "chance",
        "pretrain (FP32)",
        "midtrain (missing)",
        "sft (FP32)",
        "qat (INT4)",
        "qat .pte (INT4, ExecuTorch)",
    ]
    expected = {
        "continuation (acc)": ["0.250", "0.312", "—", "0.347 ± 0.046", "0.338", "0.329"],
        "heldout\\_bpb (bits\\_per\\_byte), lower is better": ["—", "2.41", "—", "2.17", "2.23", "—"],
    }
    for label, cells in expected.items():
        assert _md_row(md, label)[1:] == cells
        assert _html_row(html, label.replace("\\", ""))[1:] == cells
    centred = _md_row(md, "**centred accuracy** (mean over base tasks, (score - chance) / (1 - chance))")
    assert centred[2:] == ["**0.0712**", "missing (stage has not run)", "**0.0961**", "**0.0884**", "—"]
    instruct = _html_row(html, "instruct (instruct (format))")
    assert instruct[2:] == ["—", "—", "0.423", "0.417", "0.405"]
    # ± sqrt(p (1 - p) / 99): 0.0435, 0.0402, 0.0359
    exact = _html_row(html, "instruct (instruct (exact_match))")
    assert exact[1:] == ["0", "—", "—", "0.250 ± 0.044", "0.200 ± 0.040", "0.150 ± 0.036"]


def test_the_scaling_section_shows_the_planted_fit_plan_and_closed_loop(built, tmp_path):
    md = built["md"]
    section = md[md.index("## 8. Scaling law") : md.index("## 9. Runs")]
    assert "Law (form `interior`, sweep `synth`): `L = 1.7 + exp(3 - 0.32 ln N) + exp(5.7 - 0.3 ln D)`." in section
    assert "Fit error over 64 runs: RMS 1.23%, max 4.56%." in section
    assert "Held out (8 of the largest runs, never fitted): RMS 2.11%, max 3.22% against the band ±3.69%" in section
    assert "7 of 8 inside their 95% bootstrap intervals" in section
    assert "Run-to-run noise (seed replicates of 2 points): SD 1.71% of the loss." in section
    assert "per tokens and routed: 3 groups, SD of the loss 0.213% to 3.13%." in section
    assert "Plan `tiny_plan`: `l6\\_x`" not in section  # names are code spans, not escaped text
    assert "Plan `tiny_plan`: `l6_x`, predicted loss 4.254, 95% interval [4.080, 4.440]" in section
    curse = "the optimizer's curse, by the refits: -0.235%, corrected prediction 4.264."
    assert "cannot be told apart from 1 of the next 2 (`l4_dense`); " + curse in section
    assert "measured 4.537 against 4.254 predicted (+6.7%), interval [4.080, 4.440]: outside, 2.20%" in section
    control = "Closed loop, control planned within the sweep's depths and widths (by the law before S was the share)"
    control += ": `l3-y-600000` trained at the "
    control += "sweep's largest "
    assert control + "budget measured 4.391 against 4.222 predicted (+4.0%), interval [4.074, 4.404]: inside." in (
        section
    )
    shared = "Closed loop, control planned within the sweep's depths, widths and shared-expert shares (by the law "
    shared += "before S was the share): `l3-z-600000`"
    assert shared in section and "interval [4.074, 4.404]: outside, 1.00% of the loss beyond" in section
    earlier = "Closed loop, the earlier law's choice (S a yes/no): `l6-w-600000` trained at the sweep's largest budget "
    earlier += "measured 4.402 against 4.222 predicted (+4.3%)"
    beyond = "Closed loop, the law's choice planned beyond the sweep's shapes: `l6-v-600000` trained at the sweep's "
    beyond += "largest budget measured 4.467 against 4.222 predicted (+5.8%)"
    assert section.index("Closed loop: ") < section.index(control) < section.index(shared) < section.index(beyond)
    assert section.index(beyond) < section.index(earlier)
    row = ["**interior**", "10", "1.23% / 4.56%", "1.96% / 5.96%", "2.58% / 4.24% (-2.02%)", "2.11% / 3.22%"]
    assert _md_row(section, "**interior**") == row
    assert _md_row(section, "power")[3:5] == ["2.22% / 6.10%", "—"]  # a fit.json from before the column
    assert _md_row(section, "MoE vs dense") == ["MoE vs dense", "+0.170 (7/9)", "-0.00123 (3/6)"]
    assert "![Scaling law: predicted against measured loss](plots/scaling_fit.png)" in section
    assert (Path(built["summary"]["markdown"]).parent / "plots" / "scaling_fit.png").is_file()
    # no fit: the section says so and the part is named missing; a malformed fit is named
    inputs = make_inputs(tmp_path / "run")
    (tmp_path / "run" / "scaling" / "fit.json").unlink()
    assert "scaling" in collect(inputs).missing()
    _write(tmp_path / "run" / "scaling" / "fit.json", {"formula": "L"})
    with pytest.raises(ReportInputError, match=r"fit\.json: no 'fit_error'"):
        collect(inputs)
    inputs = make_inputs(tmp_path / "run2")
    _write(tmp_path / "run2" / "scaling" / "closed_loop_shared_in_range.json", {"point": "x"})
    with pytest.raises(ReportInputError, match=r"closed_loop_shared_in_range\.json: not a closed-loop result"):
        collect(inputs)


def test_a_closed_loop_with_seed_replicates_says_how_many_runs_landed_inside():
    from pipeline.report.scaling import ScalingSummary, scaling_lines

    errors = {"count": 8, "rms": 0.02, "max": 0.03}
    fit = {"formula": "L", "fit_error": errors, "held_out_error": errors, "prediction_band": 0.04}
    closed = {"point": "l6-x-600000", "measured": 4.3512, "predicted": 4.2538, "interval": [4.0799, 4.4399],
              "inside": True, "miss": 0.0, "sd": 0.0123, "inside_count": 2,
              "replicates": [{"point": p, "measured": 4.3, "inside": True, "miss": 0.0} for p in "abc"]}  # fmt: skip
    (line,) = [x for x in scaling_lines(ScalingSummary(fit, "p", None, closed, None)) if x.startswith("Closed")]
    assert "measured 4.351 (mean of 3 seeds, SD 1.23%; 2 of 3 runs inside the interval of one run)" in line
    assert line.endswith("interval [4.080, 4.440]: inside.")
    # a fit whose intervals draw each run's noise at its own group's SD says so; one before does not
    fit["noise_weights"] = {"by": ["tokens"], "groups": [{"sd_log_loss": 0.01}, {"sd_log_loss": 0.02}]}
    (weights,) = [x for x in scaling_lines(ScalingSummary(fit, "p", None, None, None)) if "weighs" in x]
    assert weights.endswith("SD of the loss 1.00% to 2.00%.")
    from pipeline.report.scaling import OWN_NOISE_UNIT
    from pipeline.scaling.bootstrap import RESIDUAL_UNIT

    assert OWN_NOISE_UNIT == RESIDUAL_UNIT  # the report reads what the fit writes
    fit["intervals"] = {"residual_unit": RESIDUAL_UNIT}
    (weights,) = [x for x in scaling_lines(ScalingSummary(fit, "p", None, None, None)) if "weighs" in x]
    assert weights.endswith("2.00%; each interval draws its run-to-run noise at its own group's SD.")
    fit["intervals"] = {"residual_unit": "something else"}
    (weights,) = [x for x in scaling_lines(ScalingSummary(fit, "p", None, None, None)) if "weighs" in x]
    assert weights.endswith("2.00%.")


def test_missing_stages_are_named_in_the_report(built):
    assert built["summary"]["missing"] == ["eval/midtrain", "profile"]
    md = built["md"]
    assert "- eval of midtrain: missing (stage has not run)" in md
    assert "Profile: missing (stage has not run)." in md
    assert "Stages that have not run (their sections say so): eval/midtrain, profile." in md
    assert "<li>eval of midtrain: missing (stage has not run)</li>" in built["html"]


def test_mixture_fp_ptq_qat_and_runs_sections_hold_the_planted_numbers(built):
    md, html = built["md"], built["html"]
    assert _md_row(md, "code")[1:] == ["75.0%", "75.0%", "40.0%"]
    assert _md_row(md, "math")[1:] == ["0%", "25.0%", "60.0%"]
    assert _md_row(md, "chat\\_math")[2:] == ["600", "60.0%", "60.0%", "60.0%", "60.0%"]
    assert _md_row(md, "QAT model, converted to INT4")[1:] == ["3.0344", "+0.00330 (vs SFT FP32)", sig(3.0344 / 1.6, 5)]
    with pytest.raises(AssertionError, match="no markdown table row"):
        _md_row(md, "control, PTQ INT4")  # not evaluated: left out, not shown empty
    assert f"QAT recovers {pct(0.603)} of the PTQ loss gap" in md
    assert _md_row(md, "qat")[1:4] == ["100", "102k", "2.50"]  # steps, tokens seen, train loss (qat_train_*)
    assert f'<a href="{RUN_URL}"><code>abc123</code></a>' in html


def test_html_is_one_self_contained_file(built):
    html, md = built["html"], built["md"]
    assert 'src="plots/' not in html
    sources = re.findall(r'<img src="([^"]*)"', html)
    assert len(sources) == md.count("](plots/") == 3  # loss curves, expert load, scaling fit (no profile plots)
    for src in sources:
        head, _, payload = src.partition(",")
        assert head == "data:image/png;base64"
        assert base64.b64decode(payload).startswith(b"\x89PNG")
    assert not re.search(r'(src|href)="(?!data:|http://127\.0\.0\.1:5000/)', html)  # only the MLflow run link
    assert not re.search(r"<link|<script|@import|url\(", html)
    for name in ("loss_curves.png", "expert_load.png"):
        assert (Path(built["summary"]["markdown"]).parent / "plots" / name).stat().st_size > 1000


def test_profile_section_embeds_its_plots_and_headline_numbers(tmp_path):
    summary = write_report(collect(make_inputs(tmp_path, profile=True)), tmp_path / "report")
    assert summary["missing"] == ["eval/midtrain"]
    md = Path(summary["markdown"]).read_text()
    assert "![Profile: throughput](plots/profile_throughput.png)" in md
    assert _md_row(md, "64")[1:] == ["13.1", "4870", "0.750"]  # TTFT ms, prefill tok/s, decode tok/s
    assert _md_row(md, "dense, same total params (equal INT4 memory)")[1:] == ["16", "0.50x", "1.25x", "0.50x"]
    assert "partly beats the dense, same total params (equal INT4 memory) at a 64-token prompt" in md
    html = Path(summary["html"]).read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 5  # with the scaling fit's


def test_a_malformed_file_is_named_and_a_missing_one_is_a_missing_stage(tmp_path):
    inputs = make_inputs(tmp_path)
    bad = _write(tmp_path / "eval" / "sft" / "metrics.json", '{"centred_acc": 0.1,')
    with pytest.raises(ReportInputError, match=re.escape(str(bad))):
        collect(inputs)
    bad.unlink()
    _write(tmp_path / "pretrain" / "loss.csv", "step,train_loss,val_loss\n10,nan?,\n")
    with pytest.raises(ReportInputError, match=re.escape(f"{tmp_path / 'pretrain' / 'loss.csv'}:2")):
        collect(inputs)
    (tmp_path / "pretrain" / "loss.csv").unlink()
    _write(tmp_path / "qat" / "model" / "meta.json", {"step": 100, "expert_load": [[1, 2], [3]]})
    with pytest.raises(ReportInputError, match="meta.json: field 'expert_load'"):
        collect(inputs)
    (tmp_path / "qat" / "metrics.json").unlink()
    bad = _write(tmp_path / "profile" / "metrics.json", {"speedup": {"dense_total": {"decode": {"16": "fast"}}}})
    with pytest.raises(ReportInputError, match=re.escape(f"{bad} speedup.dense_total.decode.16: must be a number")):
        collect(inputs)
    bad.unlink()
    data = collect(inputs)
    assert data.evals["sft"] is None and data.training["qat"] is None and data.quant is None
    assert data.training["pretrain"].train_curve == []  # no loss.csv: an empty curve, the stage still ran


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.07, "0.0700"), (3.0392916, "3.04"), (2950.6, "2950"), (9999.6, "10.0k"), (491520, "492k"), (None, "—")],
)
def test_numbers_print_with_three_significant_digits(value, text):
    assert sig(value) == text


def test_counts_and_bytes_print_with_units():
    assert (count(2_696_576), count(3.4e9), count(999_960)) == ("2.70M", "3.40B", "1.00M")
    assert (nbytes(2_272_384), nbytes(1024), nbytes(12)) == ("2.17 MiB", "1.00 KiB", "12 B")


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """Chromium and its driver from Debian's packages, installed when absent (as root)."""
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
    if all(Path(p).exists() for p in (CHROMIUM, CHROMEDRIVER)):
        return CHROMIUM, CHROMEDRIVER
    if os.geteuid() != 0:
        pytest.fail(
            f"{CHROMIUM} or {CHROMEDRIVER} is missing; install them as root with: "
            f"sudo {' '.join(install)}  (run `sudo apt-get update` first if the packages are not found)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    return CHROMIUM, CHROMEDRIVER


def test_report_renders_in_headless_chromium(built, chromium, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(chromium[1]))
    try:
        driver.set_window_size(1200, 900)
        driver.get(Path(built["summary"]["html"]).resolve().as_uri())
        images = driver.execute_script("return Array.from(document.images, i => [i.complete, i.naturalWidth])")
        assert len(images) == 3 and all(done and width > 0 for done, width in images)
        assert driver.execute_script("return document.querySelectorAll('table').length") == N_TABLES
        assert len(re.findall(r"^\|(?:-{3}:?\|)+$", built["md"], re.M)) == N_TABLES
        for value in ("0.312", "0.347 ± 0.046", "0.338", "0.329", "2.41", "0.423", "3.0344"):
            cells = driver.find_elements(By.XPATH, f"//td[normalize-space()='{value}']")
            assert cells and all(c.is_displayed() for c in cells), value
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1200, height)
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"report screenshot: {shot}")
    finally:
        driver.quit()


def test_the_report_reads_only_what_its_dvc_stage_declares(tmp_path):
    """Every file the report opens (collect and render, on a synthetic run with every
    part present) lies under a dependency of the report's DVC stage: otherwise ``dvc
    repro`` keeps a report that an undeclared input has since changed, and a machine
    without that input renders a report missing it without a word. The stage's deps are
    resolved by mapping each ``${...}`` directory onto the synthetic tree."""
    import sys

    from pipeline.stages.report import REPORT

    root = tmp_path / "run"
    inputs = make_inputs(root, profile=True)
    where = {
        "${data.out_dir}": root / "mix",
        "${stage.eval.out_dir}": root / "eval",
        "${stage.report.scaling_dir}": root / "scaling",
        "${stage.report.scaling_plan}": inputs.scaling_plan,
        **{f"${{stage.{name}.out_dir}}": root / name for name in (*STAGES, "export", "profile")},
    }
    declared = []
    for dep in REPORT.dvc.deps:
        for key, value in where.items():
            dep = dep.replace(key, str(value))
        assert "${" not in dep, dep
        declared.append(Path(dep))
    opened: list[Path] = []
    tracing = [True]

    def hook(event, args):
        if tracing[0] and event == "open" and isinstance(args[0], (str, Path)):
            opened.append(Path(args[0]))

    sys.addaudithook(hook)  # audit hooks cannot be removed: the flag turns it off
    try:
        write_report(collect(inputs), tmp_path / "report")
    finally:
        tracing[0] = False
    read = {p.resolve() for p in opened if p.resolve().is_relative_to(root.resolve())}
    assert {p.relative_to(root.resolve()).parts[0] for p in read} >= {"pretrain", "qat", "profile", "scaling", "mix"}
    undeclared = [p for p in read if not any(p == d.resolve() or p.is_relative_to(d.resolve()) for d in declared)]
    assert not undeclared, sorted(str(p.relative_to(root.resolve())) for p in undeclared)

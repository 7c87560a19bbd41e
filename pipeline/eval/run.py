"""Evaluate one model on a suite and write its results (the eval stage's work, without
Ray or tracking).

Writes into ``out``:
  metrics.json  ``{"centred_acc", "instruct"?, "form", "tasks": {name: summary},
                "pte_tasks"?: {...}}`` (DVC metrics; see TaskResult.summary)
  items.jsonl   one record per item and task: the prediction, the scores, correct or not
Timings are returned apart: they must not enter files DVC hashes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.data.tokenizer import Tokenizer
from pipeline.eval.harness import ProgramLM, TorchLM
from pipeline.eval.models import load_model
from pipeline.eval.scoring import TaskResult, aggregate, score_task
from pipeline.eval.suites import load_suite


def evaluate_suite(lm, suite: dict, chat: bool, kinds: tuple[str, ...] | None = None) -> list[TaskResult]:
    """Score every task of ``suite`` that applies: chat tasks only when ``chat``, and
    only the ``kinds`` given (all by default)."""
    results = []
    for spec, items in suite.values():
        if (spec.chat and not chat) or (kinds is not None and spec.kind not in kinds):
            continue
        results.append(score_task(spec, items, lm))
    return results


def summarise(results: list[TaskResult]) -> dict:
    """The metrics.json body for one set of results."""
    out: dict = {"centred_acc": aggregate(results), "tasks": {r.spec.name: r.summary() for r in results}}
    chat = [r for r in results if r.spec.chat]
    if chat:
        out["instruct"] = sum(r.score for r in chat) / len(chat)
    return out


def evaluate_model(
    model_path: Path,
    suite_dir: Path,
    tokenizer_path: Path,
    out: Path,
    chat: bool,
    program: Path | None = None,
    batch_size: int = 32,
) -> tuple[dict, dict[str, float]]:
    """Score the model (and, if given, the .pte on the generative tasks); write
    metrics.json and items.jsonl into ``out``. Returns (metrics, seconds)."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    suite = load_suite(suite_dir)
    tokenizer = Tokenizer.load(tokenizer_path)
    model, form = load_model(model_path)
    results = evaluate_suite(TorchLM(model, tokenizer, batch_size), suite, chat)
    seconds["eager"] = time.perf_counter() - started
    metrics = {**summarise(results), "form": form}
    records = [{"task": r.spec.name, "runtime": form, **item} for r in results for item in r.items]
    if program is not None:
        started = time.perf_counter()
        pte = evaluate_suite(ProgramLM(program, tokenizer), suite, chat, kinds=("generate",))
        seconds["pte"] = time.perf_counter() - started
        metrics["pte_tasks"] = {r.spec.name: r.summary() for r in pte}
        records += [{"task": r.spec.name, "runtime": "pte", **item} for r in pte for item in r.items]
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    with (out / "items.jsonl").open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
    return metrics, seconds

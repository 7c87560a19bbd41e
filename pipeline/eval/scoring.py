"""Task scores from harness outputs: accuracy, length-normalised accuracy, exact match,
bits per byte, and the centred aggregate.

Definitions (the standard harnesses'):
  acc       argmax_i log p(choice_i | context) is the answer
  acc_norm  argmax_i log p(choice_i | context) / len(choice_i in characters) is the answer
            (lm-eval's acc_norm)
  numeric   the number after the first "The answer is" (the recipe's answer form), else
            the last number in the output (GSM8K's flexible extraction), equals the
            answer; thousands separators are dropped
  format    the output contains the task's pattern (the headline: the instruction was
            followed); ``exact_match`` additionally needs its first group to equal the
            answer (as a number when the answer is one, else as a stripped string)
  bits_per_byte  -sum log2 p(text) / sum utf-8 bytes over the task's texts
  centred   (score - chance) / (1 - chance): 0 at chance, 1 perfect (OLMo's centred
            accuracy); the headline is its mean over the base tasks.
  stderr    of a 0/1 score over n items: sqrt(p (1 - p) / (n - 1)), the sample standard
            deviation over sqrt(n) (lm-eval's ``mean_stderr``)
  z_vs_chance  (score - chance) / sqrt(chance (1 - chance) / n): how many standard errors
            of a uniform guesser the score lies above chance (multiple choice only: a
            binomial test's z; 3 is p < 0.0014 one-sided)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from pipeline.eval.harness import GenerationRequest, bits_per_byte
from pipeline.eval.tasks import ChoiceItem, GenerateItem, Item, RollingItem, TaskSpec

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_STATED = re.compile(r"The answer is\s*(-?\d[\d,]*(?:\.\d+)?)")


@dataclass
class TaskResult:
    spec: TaskSpec
    score: float
    metrics: dict[str, float]  # every metric of the task, the headline included
    items: list[dict] = field(default_factory=list)  # per item: id, prediction, correct, scores

    @property
    def centred(self) -> float | None:
        return None if self.spec.kind == "rolling" else centred(self.score, self.spec.chance)

    def summary(self) -> dict:
        n = len(self.items)
        choice = self.spec.kind == "multiple_choice"
        return {
            "metric": self.spec.metric if self.spec.match != "format" else "format",
            "score": self.score,
            "chance": None if self.spec.kind == "rolling" else self.spec.chance,
            "centred": self.centred,
            "stderr": None if self.spec.kind == "rolling" else binomial_stderr(self.score, n),
            "z_vs_chance": z_vs_chance(self.score, self.spec.chance, n) if choice else None,
            "n": n,
            "chat": self.spec.chat,
            **{k: v for k, v in self.metrics.items() if k != "score"},
        }


def centred(score: float, chance: float) -> float:
    """``(score - chance) / (1 - chance)``; raises ValueError for chance outside [0, 1)."""
    if not 0.0 <= chance < 1.0:
        raise ValueError(f"chance must be in [0, 1), got {chance}")
    return (score - chance) / (1.0 - chance)


def binomial_stderr(score: float, n: int) -> float | None:
    """Standard error of the mean of ``n`` 0/1 outcomes whose mean is ``score``:
    ``sqrt(p (1 - p) / (n - 1))`` (the sample standard deviation over sqrt(n), as
    lm-eval's ``mean_stderr``); None when ``n < 2``."""
    if n < 2:
        return None
    return math.sqrt(score * (1.0 - score) / (n - 1))


def z_vs_chance(score: float, chance: float, n: int) -> float | None:
    """``(score - chance) / sqrt(chance (1 - chance) / n)``: the score's distance above
    chance in standard errors of a uniform guesser over ``n`` items (the normal
    approximation of a one-sided binomial test). None unless ``0 < chance < 1`` and
    ``n >= 1``."""
    if not (0.0 < chance < 1.0) or n < 1:
        return None
    return (score - chance) / math.sqrt(chance * (1.0 - chance) / n)


def last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands separators removed ("1,250" -> "1250")."""
    found = _NUMBER.findall(text)
    return _canonical(found[-1]) if found else None


def answer_number(text: str) -> str | None:
    """The number stated after the first "The answer is", else the last number."""
    stated = _STATED.search(text)
    return _canonical(stated.group(1)) if stated else last_number(text)


def _canonical(number: str) -> str:
    """One spelling per value: "1,250" -> "1250", "2.50" -> "2.5", "3.00" -> "3"."""
    value = Decimal(number.replace(",", "").rstrip("."))
    return format(value.normalize(), "f") if value != 0 else "0"


def _same_answer(extracted: str, answer: str) -> bool:
    """Numbers compared as values when the answer is a number, else stripped strings."""
    if _NUMBER.fullmatch(answer.strip()):
        return last_number(extracted) == last_number(answer)
    return extracted.strip() == answer.strip()


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def score_choices(spec: TaskSpec, items: Sequence[ChoiceItem], lm) -> TaskResult:
    """Multiple choice by log-likelihood: one request per (item, choice), batched."""
    requests = [(item.context, choice) for item in items for choice in item.choices]
    scored = lm.loglikelihood(requests)
    records, acc, acc_norm = [], [], []
    at = 0
    for item in items:
        lps = [lp for lp, _ in scored[at : at + len(item.choices)]]
        at += len(item.choices)
        pred = max(range(len(lps)), key=lambda i: lps[i])
        pred_norm = max(range(len(lps)), key=lambda i: lps[i] / len(item.choices[i]))
        acc.append(float(pred == item.answer))
        acc_norm.append(float(pred_norm == item.answer))
        records.append({"id": item.id, "logprobs": lps, "pred": pred, "pred_norm": pred_norm, "answer": item.answer})
    metrics = {"acc": _mean(acc), "acc_norm": _mean(acc_norm)}
    return TaskResult(spec, metrics["acc"], metrics, records)


def score_generation(spec: TaskSpec, items: Sequence[GenerateItem], lm) -> TaskResult:
    """Greedy generation, then the task's match (see the module doc)."""
    requests = [GenerationRequest(i.context, tuple(spec.until), spec.max_tokens, spec.chat) for i in items]
    outputs = lm.generate_until(requests)
    records, correct, formatted = [], [], []
    pattern = re.compile(spec.pattern) if spec.pattern else None
    for item, text in zip(items, outputs, strict=True):
        if spec.match == "numeric":
            extracted = answer_number(text)
            ok = extracted is not None and extracted == last_number(item.answer)
        elif spec.match == "exact":
            extracted = text.strip()
            ok = extracted == item.answer.strip()
        else:
            found = pattern.search(text)
            extracted = found.group(1) if found else None
            formatted.append(float(found is not None))
            ok = extracted is not None and _same_answer(extracted, item.answer)
        correct.append(float(ok))
        records.append({"id": item.id, "output": text, "extracted": extracted, "answer": item.answer, "correct": ok})
    metrics = {"exact_match": _mean(correct)}
    if spec.match == "format":
        metrics["format"] = _mean(formatted)
        # Instruction following is the headline: the answer in the requested form.
        return TaskResult(spec, metrics["format"], metrics, records)
    return TaskResult(spec, metrics["exact_match"], metrics, records)


def score_rolling(spec: TaskSpec, items: Sequence[RollingItem], lm) -> TaskResult:
    """Bits per byte over all the task's texts (total bits / total bytes)."""
    logprobs = lm.loglikelihood_rolling([i.text for i in items])
    n_bytes = [len(i.text.encode("utf-8")) for i in items]
    records = [
        {"id": i.id, "logprob": lp, "bytes": b, "bits_per_byte": bits_per_byte(lp, b)}
        for i, lp, b in zip(items, logprobs, n_bytes, strict=True)
    ]
    value = bits_per_byte(sum(logprobs), sum(n_bytes))
    return TaskResult(spec, value, {"bits_per_byte": value}, records)


def score_task(spec: TaskSpec, items: Sequence[Item], lm) -> TaskResult:
    """Dispatch on the task's kind."""
    return {"multiple_choice": score_choices, "generate": score_generation, "rolling": score_rolling}[spec.kind](
        spec, items, lm
    )


def aggregate(results: Sequence[TaskResult]) -> float:
    """Mean centred score over the base (non-chat) tasks that have a chance level."""
    return _mean([r.centred for r in results if r.centred is not None and not r.spec.chat])

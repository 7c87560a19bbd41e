"""The default evaluation suite, built offline from the recipe's own sources, and the
suite directory format.

Held out by construction: an item is built only from corpus units whose split key ``k``
has ``unit_hash(k) < held_out``, where ``held_out`` is the smallest ``val_fraction`` of
the mixtures (``pipeline/data/mixing.py`` puts such a unit in the val split of every
mixture, or leaves it out). Answers that also occur, word for word, in a unit that is
*not* held out (a verse repeated in another chapter, a common line of code) are
skipped, so no answer was ever a training target. A test checks both against the
mixtures' own train keys and texts.

Tasks (kind, what it probes, chance):
  continuation   multiple choice, 4   the next verse / the rest of a fortune (HellaSwag-like)
  knowledge      multiple choice, 4   what a stdlib function does, what a word means (ARC/MMLU-like)
  code           multiple choice, 4   the next line of a stdlib function
  math           generate, numeric    a word or arithmetic problem (GSM8K-like)
  worked_answer  multiple choice, 4   the answer a worked solution reaches: a held-out generated
                                      problem and its steps, then "The answer is"; the choices
                                      are numbers of the steps (reading a solution to its end,
                                      not computing it)
  compare        multiple choice, 2   which of two decimals is larger, as the solution states
                                      it ("a < b." or "a > b."): number sense, held out
  instruct       generate, format     a chat question (half arithmetic, half reasoning: the SFT
                                      mixture's math and reason tasks) answered in the form
                                      instruction tuning teaches ("... The answer is X."); run
                                      on the chat models and, as the before-SFT reference, on
                                      midtrain's; exact_match needs X right as well
  heldout_bpb    rolling              bits per byte on held-out text of every domain

A suite directory holds ``suite.json`` (specs, counts, sha256 per file) and one
``<task>.jsonl`` per task.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, replace
from pathlib import Path

from pipeline.configbase import from_dict, require
from pipeline.data import generated
from pipeline.data.base import DataError, normalise, unit_hash
from pipeline.data.sft_tasks import split_halves
from pipeline.data.sources import SourceConfig, check_available, iter_documents
from pipeline.data.stdlib import DEFAULT_EXCLUDE, python_definitions, source_root
from pipeline.eval.config import SuiteConfig
from pipeline.eval.tasks import (
    ChoiceItem,
    GenerateItem,
    Item,
    RollingItem,
    TaskFileError,
    TaskSpec,
    read_items,
    write_items,
)
from pipeline.hashing import sha256_file

SUITE_FILE = "suite.json"
SUITE_VERSION = 1


SPECS = {
    "continuation": TaskSpec("continuation", "multiple_choice", "literature", chance=0.25),
    "knowledge": TaskSpec("knowledge", "multiple_choice", "knowledge", chance=0.25),
    "code": TaskSpec("code", "multiple_choice", "code", chance=0.25),
    "math": TaskSpec("math", "generate", "math", match="numeric", until=["\n"], max_tokens=64),
    "worked_answer": TaskSpec("worked_answer", "multiple_choice", "math", chance=0.25),
    "compare": TaskSpec("compare", "multiple_choice", "reasoning", chance=0.5),
    "instruct": TaskSpec(
        "instruct",
        "generate",
        "instruction",
        chat=True,
        match="format",
        # A number (decimals too: the comparison problems) or one word (a name, yes/no).
        pattern=r"The answer is (-?\d[\d,]*(?:\.\d+)?|[A-Za-z]+)\.",
        max_tokens=64,
    ),
    "heldout_bpb": TaskSpec("heldout_bpb", "rolling", "mixed"),
}


# --- building ------------------------------------------------------------------------------


def _held(key: str, band: float) -> bool:
    return unit_hash(key) < band


def _source(kind: str, **options) -> Iterator:
    return iter_documents(SourceConfig(name=f"eval/{kind}", kind=kind, options=options))


def _choice_items(
    name: str, pool: list[tuple[str, str, str]], n: int, rng: random.Random, n_choices: int = 4
) -> list[ChoiceItem]:
    """``pool`` of (source_key, context, answer): each item gets ``n_choices - 1`` other
    answers of the pool as distractors, in a seeded random order."""
    rng.shuffle(pool)
    answers = [a for _, _, a in pool]
    items = []
    for key, context, answer in pool:
        others = [a for a in rng.sample(answers, min(len(answers), 3 * n_choices)) if a != answer]
        others = list(dict.fromkeys(others))[: n_choices - 1]
        if len(others) < n_choices - 1:
            continue
        choices = [answer, *others]
        rng.shuffle(choices)
        items.append(ChoiceItem(f"{name}/{len(items)}", context, tuple(choices), choices.index(answer), key))
        if len(items) == n:
            break
    return items


def _fits(context: str, answer: str, max_chars: int) -> bool:
    """Context and answer each within half the budget: any choice fits beside any context."""
    return len(context) <= max_chars // 2 and len(answer) + 1 <= max_chars // 2


def _not_elsewhere(pool: list[tuple[str, str, str]], outside: set[str]) -> list[tuple[str, str, str]]:
    return [p for p in pool if normalise(p[2]) not in outside]


def _continuation(n: int, rng: random.Random, band: float, max_chars: int) -> list[ChoiceItem]:
    held, outside = [], set()
    previous = None
    for doc in _source("bible", verses_per_doc=1):
        verse = normalise(doc.text.split("\n", 1)[1])
        if not _held(doc.key, band):
            outside.add(normalise(" " + verse))
        elif previous is not None and previous[0] == doc.key and _fits(previous[1], verse, max_chars):
            held.append((doc.key, previous[1], " " + verse))
        previous = (doc.key, verse)
    bible = _not_elsewhere(held, outside)
    fortunes, outside = [], set()
    for doc in _source("fortunes"):
        halves = split_halves(doc.text)
        if halves is None:
            continue
        first, rest = normalise(halves[0]), " " + normalise(halves[1])
        if not _held(doc.split_key(), band):
            outside.add(normalise(rest))
        elif len(rest) >= 8 and _fits(first, rest, max_chars):
            fortunes.append((doc.split_key(), first, rest))
    fortunes = _not_elsewhere(fortunes, outside)
    half = n // 2
    items = _choice_items("continuation", bible, half, rng) + _choice_items("continuation", fortunes, n - half, rng)
    return _renumber("continuation", items)


def _renumber(name: str, items: list[ChoiceItem]) -> list[ChoiceItem]:
    return [replace(item, id=f"{name}/{i}") for i, item in enumerate(items)]


def _knowledge(n: int, rng: random.Random, band: float, max_chars: int) -> list[ChoiceItem]:
    pool, outside = [], set()
    for doc in _source("python_docs"):
        summary = doc.meta["summary"]
        if not _held(doc.key, band):
            outside.add(normalise(" " + summary))  # e.g. bisect_left and bisect_right share one
            continue
        question = f"Question: What does `{doc.meta['qualname']}` do?\nAnswer:"
        if len(summary) >= 20 and _fits(question, summary, max_chars):
            pool.append((doc.key, question, " " + summary))
    pool = _not_elsewhere(pool, outside)
    words, outside = [], set()
    try:
        check_available(SourceConfig(name="eval/wordnet", kind="wordnet"))
        for doc in _source("wordnet"):
            term, definition = doc.meta["term"], doc.meta["definition"]
            question = f"Question: What does the word '{term}' mean?\nAnswer:"
            if not _held(doc.key, band):
                outside.add(normalise(" " + definition))
            elif len(definition) >= 10 and _fits(question, definition, max_chars):
                words.append((doc.key, question, " " + definition))
        words = _not_elsewhere(words, outside)
    except DataError:
        pass  # wordnet is optional (Debian's wordnet-base): python_docs alone then
    half = n // 2 if words else n
    items = _choice_items("knowledge", pool, half, rng) + _choice_items("knowledge", words, n - half, rng)
    return _renumber("knowledge", items)


def _code(n: int, rng: random.Random, band: float, max_chars: int) -> list[ChoiceItem]:
    held, outside = [], set()
    for d in python_definitions(source_root({"root": None}), DEFAULT_EXCLUDE):
        lines = d.code_without_docstring.split("\n")
        if not _held(d.key, band):
            outside.update(normalise(line) for line in lines)
            continue
        if d.kind == "class" or len(lines) < 3:
            continue
        candidates = [
            k
            for k in range(1, min(len(lines), 10))
            if 12 <= len(lines[k].strip()) and not lines[k].lstrip().startswith("#")
        ]
        if not candidates:
            continue
        k = rng.choice(candidates)
        context = f"# module: {d.module}\n" + "\n".join(lines[:k]) + "\n"
        if _fits(context, lines[k], max_chars):
            held.append((d.key, context, lines[k]))
    pool = _not_elsewhere(held, outside)
    # Distractors are other functions' lines at the answer's indentation, so the
    # whitespace gives nothing away.
    rng.shuffle(pool)
    stripped = [a.strip() for _, _, a in pool]
    items = []
    for key, context, answer in pool:
        indent = answer[: len(answer) - len(answer.lstrip())]
        others = list(dict.fromkeys(s for s in rng.sample(stripped, min(len(stripped), 12)) if s != answer.strip()))
        if len(others) < 3:
            continue
        choices = [answer, *(indent + s for s in others[:3])]
        rng.shuffle(choices)
        items.append(ChoiceItem(f"code/{len(items)}", context, tuple(choices), choices.index(answer), key))
        if len(items) == n:
            break
    return items


def _problems(generators, n: int, seed: int, band: float, max_chars: int) -> list[generated.Problem]:
    out, seen = [], set()
    for p in generated.problems(generators, 400 * n, seed):
        key = generated.problem_key(p)
        if key not in seen and _held(key, band) and len(p.question) + 20 <= max_chars:
            seen.add(key)
            out.append(p)
            if len(out) == n:
                break
    return out


def _math(n: int, rng: random.Random, band: float, max_chars: int) -> list[GenerateItem]:
    problems = _problems(generated.ARITHMETIC, n, rng.randrange(2**31), band, max_chars)
    return [
        GenerateItem(f"math/{i}", f"Question: {p.question}\nAnswer:", p.answer, generated.problem_key(p))
        for i, p in enumerate(problems)
    ]


_NUMBERS = re.compile(r"-?\d+")


def _worked_answer(n: int, rng: random.Random, band: float, max_chars: int) -> list[ChoiceItem]:
    """Held-out arithmetic problems with their worked steps as context; the answer is
    the number the steps end on, the three distractors other numbers of the steps (so
    every choice is a number the context shows). Problems whose steps hold fewer than
    three other numbers (a bare ``a + b = c``) are skipped."""
    items = []
    for p in _problems(generated.ARITHMETIC, 8 * n, rng.randrange(2**31), band, max_chars):
        steps = p.worked.removesuffix(f" The answer is {p.answer}.")
        others = [x for x in dict.fromkeys(_NUMBERS.findall(steps)) if x != p.answer]
        context = f"Question: {p.question}\nAnswer: {steps} The answer is"
        if len(others) < 3 or not _fits(context, f" {p.answer}.", max_chars):
            continue
        choices = [f" {x}." for x in [p.answer, *rng.sample(others, 3)]]
        rng.shuffle(choices)
        items.append(
            ChoiceItem(
                f"worked_answer/{len(items)}",
                context,
                tuple(choices),
                choices.index(f" {p.answer}."),
                generated.problem_key(p),
            )
        )
        if len(items) == n:
            break
    return items


def _compare(n: int, rng: random.Random, band: float, max_chars: int) -> list[ChoiceItem]:
    """Held-out "Which is larger, a or b?" problems (the reasoning generators' comparison
    topic); the choices are the solution's statement and its opposite (`` a < b.`` /
    `` a > b.``), in a seeded order. Held out by the problem's key, as every generated
    task; a comparison's key is its unordered pair, so the swapped question ("b or a")
    is held out with it."""
    items, seen = [], set()
    for p in generated.problems(generated.REASONING, 400 * n, rng.randrange(2**31)):
        key = generated.problem_key(p)
        if p.topic != "comparison" or key in seen or not _held(key, band):
            continue
        seen.add(key)
        right = " " + p.worked.removesuffix(f" The answer is {p.answer}.")
        wrong = right.replace(" < ", " > ") if " < " in right else right.replace(" > ", " < ")
        context = f"Question: {p.question}\nAnswer:"
        if not _fits(context, right, max_chars):
            continue
        choices = [right, wrong]
        rng.shuffle(choices)
        items.append(ChoiceItem(f"compare/{len(items)}", context, tuple(choices), choices.index(right), key))
        if len(items) == n:
            break
    return items


def _instruct(n: int, rng: random.Random, band: float, max_chars: int) -> list[GenerateItem]:
    """Held-out problems as chat questions: the first half arithmetic, the rest
    reasoning (ordering, comparison, counting, sequences, syllogisms), as the SFT
    mixture's ``math`` and ``reason`` tasks pose them."""
    half = n // 2
    problems = _problems(generated.ARITHMETIC, half, rng.randrange(2**31), band, max_chars)
    problems += _problems(generated.REASONING, n - half, rng.randrange(2**31), band, max_chars)
    return [
        GenerateItem(f"instruct/{i}", p.question, p.answer, generated.problem_key(p)) for i, p in enumerate(problems)
    ]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0]


def _heldout(n: int, rng: random.Random, band: float, max_chars: int) -> list[RollingItem]:
    per = {
        "bible": (_source("bible", verses_per_doc=6), lambda d: d.key),
        "fortunes": (_source("fortunes"), lambda d: d.split_key()),
        "python_code": (_source("python_code"), lambda d: d.key),
        "python_docs": (_source("python_docs"), lambda d: d.key),
        "arithmetic": (_source("arithmetic", n_docs=40_000, seed=rng.randrange(2**31)), lambda d: d.key),
        "reasoning": (_source("reasoning", n_docs=40_000, seed=rng.randrange(2**31)), lambda d: d.key),
    }
    quota = [n // len(per) + (1 if i < n % len(per) else 0) for i in range(len(per))]
    items: list[RollingItem] = []
    for (docs, key_of), want in zip(per.values(), quota, strict=True):
        taken = 0
        for doc in docs:
            if taken == want:
                break
            if _held(key_of(doc), band) and len(doc.text) >= 40:
                items.append(RollingItem(f"heldout_bpb/{len(items)}", _cut(doc.text, max_chars), key_of(doc)))
                taken += 1
    return items


BUILDERS: dict[str, Callable[[int, random.Random, float, int], list[Item]]] = {
    "continuation": _continuation,
    "knowledge": _knowledge,
    "code": _code,
    "math": _math,
    "worked_answer": _worked_answer,
    "compare": _compare,
    "instruct": _instruct,
    "heldout_bpb": _heldout,
}


def build_suite(cfg: SuiteConfig, held_out: float, out: Path, files: Mapping[str, Path] | None = None) -> dict:
    """Write every task of ``cfg`` into ``out`` (an empty directory) with ``suite.json``;
    returns the suite record. ``held_out`` is the smallest val_fraction of the mixtures;
    ``files`` maps a benchmark's configured path to the file to read (a copy on this
    node), else the path is read as it is. The record keeps the path as configured, with
    the file's sha256, so it names no machine.

    Raises DataError when the held-out band cannot supply a task's item count (naming
    the task, the count found and how to get more), TaskFileError for a bad benchmark
    file (naming the file and line)."""
    from pipeline.eval.benchmarks import load_benchmark

    require(0.0 < held_out < 0.5, "held_out", f"must be in (0, 0.5), got {held_out}")
    out = Path(out)
    tasks: dict[str, dict] = {}
    for name, count in cfg.items.items():
        rng = random.Random(f"{cfg.seed}:{name}")  # str seeds are stable across runs
        items = BUILDERS[name](count, rng, held_out, cfg.max_chars)
        if len(items) < count:
            raise DataError(
                f"eval task {name!r}: the held-out {held_out:.1%} of its sources gives {len(items)} items, "
                f"fewer than the {count} asked (lower stage.evalsets.items.{name}, raise the mixtures' val_fraction, "
                f"or raise stage.evalsets.max_chars ({cfg.max_chars}) when the task's items are longer)"
            )
        spec = SPECS[name] if SPECS[name].kind != "generate" else replace(SPECS[name], max_tokens=cfg.max_tokens)
        tasks[name] = _write_task(out, spec, items, cfg.seed)
    for bench in cfg.benchmarks:
        path = Path(files[bench.path]) if files else Path(bench.path)
        spec, items = load_benchmark(bench.layout, path, bench.name, bench.limit)
        tasks[spec.name] = _write_task(out, spec, items, cfg.seed, source=f"{bench.path} sha256:{sha256_file(path)}")
    record = {"version": SUITE_VERSION, "held_out": held_out, "seed": cfg.seed, "tasks": tasks}
    (out / SUITE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return record


def _write_task(out: Path, spec: TaskSpec, items: list[Item], seed: int, source: str = "built") -> dict:
    file = out / f"{spec.name}.jsonl"
    n = write_items(file, items)
    return {
        "spec": asdict(spec),
        "file": file.name,
        "items": n,
        "sha256": sha256_file(file),
        "seed": seed,
        "source": source,
    }


# --- reading -------------------------------------------------------------------------------


def load_suite(directory: Path) -> dict[str, tuple[TaskSpec, list[Item]]]:
    """Every task of a suite directory, checked: the record parses, each file exists and
    matches its sha256 and count, each item is well formed. Raises TaskFileError naming
    the file (and line) at fault."""
    directory = Path(directory)
    path = directory / SUITE_FILE
    if not path.is_file():
        raise TaskFileError(f"{path}: missing suite record (build it with: make evalsets)")
    try:
        record = json.loads(path.read_text())
        tasks = record["tasks"]
    except (ValueError, KeyError, TypeError) as err:
        raise TaskFileError(f"{path}: not a suite record ({err})") from None
    suite = {}
    for name, info in tasks.items():
        try:
            spec = from_dict(TaskSpec, info["spec"], f"tasks.{name}.spec")
            file, sha, count = directory / info["file"], info["sha256"], info["items"]
        except (ValueError, KeyError, TypeError) as err:
            raise TaskFileError(f"{path}: task {name!r}: not a task record ({type(err).__name__}: {err})") from None
        if file.is_file() and sha256_file(file) != sha:
            raise TaskFileError(f"{file}: does not match the sha256 in {path} (edited or damaged; rebuild the suite)")
        items = read_items(file, spec.kind)
        if len(items) != count:
            raise TaskFileError(f"{file}: {len(items)} items, {path} says {count}")
        suite[name] = (spec, items)
    return suite

"""Evaluation: the harness against naive references, the metrics against hand-computed
values, task files that say what is wrong where, a suite that is held out of every
training split, and lm-eval (Python and command line) scoring exactly what the harness
scores."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from shapes import micro_cfg, trained_like

from pipeline.data.base import normalise
from pipeline.data.tokenizer import Tokenizer
from pipeline.eval.config import SuiteConfig
from pipeline.eval.harness import GenerationRequest, ProgramLM, TorchLM
from pipeline.eval.scoring import aggregate, answer_number, centred, score_choices, score_generation, score_rolling
from pipeline.eval.suites import build_suite, load_suite
from pipeline.eval.tasks import ChoiceItem, GenerateItem, RollingItem, TaskFileError, TaskSpec, read_items

REPO = Path(__file__).resolve().parents[2]
LM_EVAL_TASKS = REPO / "conf" / "lm_eval"


@pytest.fixture(scope="module")
def tokenizer(micro_data) -> Tokenizer:
    return Tokenizer.load(micro_data / "tokenizer" / "tokenizer.json")


@pytest.fixture(scope="module")
def fp_model():
    return trained_like(micro_cfg(), seed=3)


PAIRS = [
    ("Question: What is 12 + 30?\nAnswer:", " 12 + 30 = 42. The answer is 42."),
    ("The LORD is my shepherd;", " I shall not want."),
    ("def add(a, b):", "\n    return a + b"),
    ("x", " y"),
    ("A much longer context that runs on for a while, so that batches hold rows of unequal length,", " and ends."),
]


# --- the harness ----------------------------------------------------------------------------


def test_loglikelihood_is_the_sum_of_the_continuations_token_logprobs(fp_model, tokenizer):
    lm = TorchLM(fp_model, tokenizer, batch_size=4)
    for (context, continuation), (logprob, greedy) in zip(PAIRS, lm.loglikelihood(PAIRS)):
        ctx = tokenizer.encode(context)
        cont = tokenizer.encode(context + continuation)[len(ctx) :]
        ids = [tokenizer.bos_id, *ctx, *cont]
        with torch.no_grad():
            logits = fp_model(torch.tensor([ids]))[0]
        # Token ids[p] is predicted at position p - 1, one position at a time.
        naive, argmax_all = 0.0, True
        for p in range(1 + len(ctx), len(ids)):
            row = torch.log_softmax(logits[p - 1].double(), dim=-1)
            naive += float(row[ids[p]])
            argmax_all &= int(row.argmax()) == ids[p]
        assert logprob == pytest.approx(naive, abs=1e-4)
        assert greedy is argmax_all


def test_trailing_whitespace_of_the_context_moves_onto_the_continuation(fp_model, tokenizer):
    lm = TorchLM(fp_model, tokenizer)
    a, b = lm.loglikelihood([("Answer: ", "42"), ("Answer:", " 42")])
    assert a[0] == pytest.approx(b[0], abs=1e-6)


def test_batched_scores_equal_one_at_a_time(fp_model, tokenizer):
    one = TorchLM(fp_model, tokenizer, batch_size=1)
    many = TorchLM(fp_model, tokenizer, batch_size=5)
    for (a, ga), (b, gb) in zip(one.loglikelihood(PAIRS), many.loglikelihood(PAIRS)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    texts = [c + x for c, x in PAIRS]
    assert many.loglikelihood_rolling(texts) == pytest.approx(one.loglikelihood_rolling(texts), abs=1e-4)


def test_batched_generation_equals_greedy_decoding_with_the_kv_cache(fp_model, tokenizer):
    from pipeline.export.runner import EagerRunner, greedy

    requests = [GenerationRequest(c, ("\n\n",), max_tokens=7) for c, _ in PAIRS]
    outputs = TorchLM(fp_model, tokenizer, batch_size=3).generate_until(requests)
    stops = {tokenizer.eos_id, tokenizer.end_id}
    for request, output in zip(requests, outputs):
        prompt = [tokenizer.bos_id, *tokenizer.encode(request.context)]
        ids = greedy(EagerRunner(fp_model, 128), prompt, 7)
        kept = []
        for token in ids:
            if token in stops:
                break
            kept.append(token)
        expected = tokenizer.decode(kept).split("\n\n")[0]
        assert output == expected


def test_program_generation_is_greedy_decoding_through_the_kv_cache(lowered, tokenizer):
    # Against the export stage's own greedy loop over the same program: positions, stops
    # and the stop-string cut are ProgramLM's; the numerics are the runtime's on both sides.
    from pipeline.export.runner import PteRunner, greedy

    path = lowered["dir"] / "model.pte"
    requests = [GenerationRequest(c, ("\n\n",), max_tokens=6) for c, _ in PAIRS[:3]]
    outputs = ProgramLM(path, tokenizer).generate_until(requests)
    for request, output in zip(requests, outputs):
        ids = greedy(PteRunner(path), [tokenizer.bos_id, *tokenizer.encode(request.context)], 6)
        kept = []
        for token in ids:
            if token in (tokenizer.eos_id, tokenizer.end_id):
                break
            kept.append(token)
        assert output == tokenizer.decode(kept).split("\n\n")[0]
    assert any(outputs)  # something was generated


def test_a_request_longer_than_the_context_is_refused(fp_model, tokenizer):
    from pipeline.eval.harness import EvalInputError

    with pytest.raises(EvalInputError, match="exceeds the model's context of 128"):
        TorchLM(fp_model, tokenizer).loglikelihood([("word " * 200, " end")])


# --- the metrics, by hand ----------------------------------------------------------------------


class PlantedLM:
    """Returns planted log-likelihoods and outputs, in request order."""

    def __init__(self, logprobs=(), outputs=()):
        self.logprobs, self.outputs = list(logprobs), list(outputs)

    def loglikelihood(self, requests):
        assert len(requests) == len(self.logprobs)
        return [(lp, False) for lp in self.logprobs]

    def loglikelihood_rolling(self, texts):
        return self.logprobs[: len(texts)]

    def generate_until(self, requests):
        return self.outputs[: len(requests)]


def test_accuracy_and_length_normalised_accuracy_by_hand():
    spec = TaskSpec("t", "multiple_choice", chance=1 / 3)
    items = [
        ChoiceItem("a", "c", (" x", " yyyyyyyy", " zz"), 1),  # raw argmax 0; per char: -1/2, -2/9, -3/3 -> 1
        ChoiceItem("b", "c", (" p", " q", " r"), 2),  # raw argmax 2, per char also 2
    ]
    result = score_choices(spec, items, PlantedLM([-1.0, -2.0, -3.0, -5.0, -4.0, -0.5]))
    assert result.metrics == {"acc": 0.5, "acc_norm": 1.0}
    assert result.centred == pytest.approx((0.5 - 1 / 3) / (2 / 3))
    assert [r["pred"] for r in result.items] == [0, 2] and [r["pred_norm"] for r in result.items] == [1, 2]


def test_numeric_answers_are_read_the_way_gsm8k_and_the_recipe_state_them():
    assert answer_number("3 × 4 = 12. The answer is 12. Then 7") == "12"  # stated beats last
    assert answer_number("so we get 1,250 apples") == "1250"
    assert answer_number("-3 and then 4.0") == "4"
    assert answer_number("no digits") is None
    assert answer_number("it costs 2.50") == "2.5" and answer_number("3.00 left") == "3"
    spec = TaskSpec("m", "generate", match="numeric")
    items = [GenerateItem("a", "q", "1250"), GenerateItem("b", "q", "7"), GenerateItem("c", "q", "5")]
    result = score_generation(spec, items, PlantedLM(outputs=[" it is 1,250", " 8 - 1 = 7. The answer is 6.", ""]))
    assert result.score == pytest.approx(1 / 3)


def test_a_continuation_that_merges_into_the_context_is_refused(fp_model, tokenizer):
    from pipeline.eval.harness import EvalInputError

    words = ["The", "that", "answer", "return", "shepherd", "function", "should", "number"]
    merged = next(w for w in words if tokenizer.encode(w)[: len(tokenizer.encode(w[:-1]))] != tokenizer.encode(w[:-1]))
    with pytest.raises(EvalInputError, match="merges into the context"):
        TorchLM(fp_model, tokenizer).loglikelihood([(merged[:-1], merged[-1])])


def test_format_task_scores_compliance_and_keeps_exact_match_apart():
    spec = TaskSpec("f", "generate", chat=True, match="format", pattern=r"The answer is (-?[\d,]+)\.")
    items = [GenerateItem("a", "q", "4"), GenerateItem("b", "q", "9"), GenerateItem("c", "q", "2")]
    outputs = ["2 + 2 = 4. The answer is 4.", "The answer is 8.", "four"]
    result = score_generation(spec, items, PlantedLM(outputs=outputs))
    assert result.metrics == {"exact_match": pytest.approx(1 / 3), "format": pytest.approx(2 / 3)}
    assert result.score == pytest.approx(2 / 3)
    words = TaskSpec("w", "generate", match="format", pattern=r"Capital: (\w+)")
    named = score_generation(words, [GenerateItem("a", "q", "Paris")], PlantedLM(outputs=["Capital: London"]))
    assert named.metrics == {"exact_match": 0.0, "format": 1.0}  # a word answer is compared as a word


def test_bits_per_byte_is_total_bits_over_total_bytes():
    spec = TaskSpec("r", "rolling")
    items = [RollingItem("a", "abcd"), RollingItem("b", "é")]  # 4 + 2 utf-8 bytes
    result = score_rolling(spec, items, PlantedLM([-math.log(2) * 3, -math.log(2) * 9]))
    assert result.score == pytest.approx(12 / 6)
    assert result.centred is None


def test_the_headline_averages_centred_scores_of_base_tasks_only():
    mc = score_choices(
        TaskSpec("a", "multiple_choice", chance=0.25), [ChoiceItem("x", "c", (" a", " b"), 0)], PlantedLM([-1.0, -2.0])
    )
    chat = score_generation(
        TaskSpec("b", "generate", chat=True, match="format", pattern="(x)"),
        [GenerateItem("y", "q", "x")],
        PlantedLM(outputs=["x"]),
    )
    rolling = score_rolling(TaskSpec("c", "rolling"), [RollingItem("z", "ab")], PlantedLM([-1.0]))
    assert aggregate([mc, chat, rolling]) == pytest.approx(1.0)  # only the mc task: (1 - .25) / .75
    assert centred(0.4, 0.25) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="chance"):
        centred(0.5, 1.0)


def test_standard_errors_and_distance_from_chance_against_the_counts():
    import statistics

    from pipeline.eval.scoring import binomial_stderr, z_vs_chance

    outcomes = [1.0] * 13 + [0.0] * 27  # 13 of 40 right
    # lm-eval's reading: the sample standard deviation of the 0/1 outcomes over sqrt(n).
    assert binomial_stderr(13 / 40, 40) == pytest.approx(statistics.stdev(outcomes) / math.sqrt(40))
    # In counts: (right - expected right) / the binomial standard deviation of a guesser.
    assert z_vs_chance(13 / 40, 0.2, 40) == pytest.approx((13 - 40 * 0.2) / math.sqrt(40 * 0.2 * 0.8))
    assert binomial_stderr(1.0, 1) is None and z_vs_chance(0.3, 0.0, 40) is None
    spec = TaskSpec("t", "multiple_choice", chance=0.5)
    items = [ChoiceItem(str(i), "c", (" a", " b"), i % 2) for i in range(5)]  # 3 of 5 answer 0
    summary = score_choices(spec, items, PlantedLM([-1.0, -2.0] * 5)).summary()
    assert summary["score"] == pytest.approx(0.6) and summary["n"] == 5
    assert summary["stderr"] == pytest.approx(statistics.stdev([1, 0, 1, 0, 1]) / math.sqrt(5))
    assert summary["z_vs_chance"] == pytest.approx((3 - 2.5) / math.sqrt(5 * 0.25))
    generated = score_generation(
        TaskSpec("g", "generate"), [GenerateItem("a", "q", "1")] * 2, PlantedLM(outputs=["1", "2"])
    )
    assert generated.summary()["z_vs_chance"] is None and generated.summary()["stderr"] == pytest.approx(0.5 / 1)
    assert (
        score_rolling(TaskSpec("r", "rolling"), [RollingItem("z", "ab")], PlantedLM([-1.0])).summary()["stderr"] is None
    )


# --- task files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"id": "a", "context": "c", "answer": 0}', r":2: missing field 'choices'"),
        (
            '{"id": "a", "context": "c", "choices": [" x", " y"], "answer": 2}',
            r":2: answer index 2 is out of range for 2",
        ),
        (
            '{"id": "a", "context": "c", "choices": [" x"], "answer": 0}',
            r":2: field 'choices' must be a list of at least 2",
        ),
        (
            '{"id": "a", "context": "c", "choices": [" x", " y"], "answer": "0"}',
            r":2: field 'answer' must be an integer",
        ),
        ('{"id": "a", "context": "c", "choices": [" x", " y"], "answer": 0, "label": 1}', r":2: unknown field 'label'"),
        ('{"id": "a", "context": "c", "choices": [" x", " y"', r":2: not valid json"),
        (
            '{"id": "first", "context": "c", "choices": [" x", " y"], "answer": 0}',
            r":2: duplicate id 'first' \(first on line 1\)",
        ),
    ],
)
def test_a_malformed_task_file_is_named_with_its_line(tmp_path, line, problem):
    path = tmp_path / "task.jsonl"
    good = '{"id": "first", "context": "c", "choices": [" x", " y"], "answer": 1}'
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(TaskFileError, match=f"{path}{problem}"):
        read_items(path, "multiple_choice")


# --- the suite -------------------------------------------------------------------------------------

MICRO_MAX_TOKENS = 8
MICRO_ITEMS = {
    "continuation": 6,
    "knowledge": 6,
    "code": 6,
    "math": 6,
    "worked_answer": 6,
    "compare": 6,
    "instruct": 4,
    "heldout_bpb": 6,
}


@pytest.fixture(scope="module")
def micro_suite(tmp_path_factory) -> tuple[Path, float]:
    """The suite as the micro preset builds it (held out below its val_fraction)."""
    from pipeline.recipe import compose

    raw = compose(["experiment=micro"])
    held_out = min(raw["data"][m]["val_fraction"] for m in ("pretrain", "midtrain", "sft"))
    out = tmp_path_factory.mktemp("suite")
    build_suite(SuiteConfig(items=MICRO_ITEMS, max_chars=200, max_tokens=MICRO_MAX_TOKENS), held_out, out)
    return out, raw


def test_no_suite_item_is_in_any_training_split(micro_suite):
    from pipeline.configbase import from_dict
    from pipeline.data.mixing import MixtureConfig, collect

    out, raw = micro_suite
    suite = load_suite(out)
    assert {name: len(items) for name, (_, items) in suite.items()} == MICRO_ITEMS
    cache: dict = {}
    train_keys, train_text = set(), []
    for name in ("pretrain", "midtrain", "sft"):
        collected = collect(from_dict(MixtureConfig, raw["data"][name], f"data.{name}"), cache)
        for source in collected.sources:
            train_keys.update(doc.split_key() for doc in source.train)
            train_text.extend(normalise(doc.text) for doc in source.train)
    corpus = "\n".join(train_text)
    checked = 0
    for spec, items in suite.values():
        for item in items:
            assert item.source_key not in train_keys, (spec.name, item.id)
            if spec.kind == "multiple_choice":  # distinct choices, as many as the chance level says
                assert len(set(item.choices)) == len(item.choices) == round(1 / spec.chance), item
            # The answer (or, for generation, the question) never occurs in training text.
            probe = {
                "multiple_choice": lambda i: i.choices[i.answer],
                "generate": lambda i: i.context.removeprefix("Question: ").split("\n")[0],
                "rolling": lambda i: i.text,
            }[spec.kind](item)
            if len(probe.strip()) >= 20:
                assert normalise(probe) not in corpus, (spec.name, item.id, probe)
                checked += 1
    assert checked >= 20


def test_generated_choice_tasks_answer_what_the_question_asks(micro_suite):
    """The two tasks on held-out generated problems, checked against the question itself
    (not the generator's worked text): the larger decimal; the value of a product or of
    ``(a op b) × c``. Every choice of worked_answer is a number the solution shows."""
    import re

    suite = load_suite(micro_suite[0])
    for item in suite["compare"][1]:
        a, b = re.fullmatch(r"Question: Which is larger, ([\d.]+) or ([\d.]+)\?\nAnswer:", item.context).groups()
        assert item.choices[item.answer] == f" {a} {'>' if float(a) > float(b) else '<'} {b}."
        assert {c[len(a) + 2] for c in item.choices} == {"<", ">"}
    computed = 0
    for item in suite["worked_answer"][1]:
        question, steps = item.context.removeprefix("Question: ").split("\nAnswer: ")
        shown = re.findall(r"-?\d+", steps)
        assert all(c.strip().rstrip(".") in shown for c in item.choices), item
        product = re.fullmatch(r"What is (\d+) × (\d+)\?", question)
        chain = re.fullmatch(r"Compute \((\d+) ([+-]) (\d+)\) × (\d+)\.", question)
        if product:
            value = int(product[1]) * int(product[2])
        elif chain:
            a, b = int(chain[1]), int(chain[3])
            value = (a + b if chain[2] == "+" else a - b) * int(chain[4])
        else:
            continue
        assert item.choices[item.answer] == f" {value}.", item
        computed += 1
    assert computed >= 2


def test_the_instruct_pattern_reads_every_generator_answer_as_sft_writes_it(micro_suite):
    """Whatever a worked solution ends with (a number, a decimal, a name, yes/no), the
    chat task's pattern reads back exactly its answer; the suite's chat items are half
    arithmetic, half reasoning problems."""
    import re

    from pipeline.data import generated
    from pipeline.eval.suites import SPECS

    pattern = re.compile(SPECS["instruct"].pattern)
    topics = set()
    for p in generated.problems(generated.ARITHMETIC + generated.REASONING, 600, seed=5):
        assert pattern.search(p.worked)[1] == p.answer, p
        topics.add(p.topic)
    assert {"comparison", "ordering", "syllogism", "word problem"} <= topics
    items = load_suite(micro_suite[0])["instruct"][1]
    reasoning = re.compile(r"Who is the|Which is larger|How many times does the letter|What comes next|^All ")
    half = len(items) // 2
    assert len(items) == MICRO_ITEMS["instruct"]
    assert [bool(reasoning.search(i.context)) for i in items] == [False] * half + [True] * (len(items) - half)


def test_the_suite_is_deterministic_and_joins_benchmark_files(tmp_path):
    from pipeline.eval.config import BenchmarkConfig

    bench = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(5)]
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = SuiteConfig(
        items={"math": 4, "continuation": 4},
        benchmarks=[BenchmarkConfig("gsm8k", "gsm8k.jsonl", limit=3)],
        max_chars=200,
    )
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        out.mkdir()
        build_suite(cfg, 0.1, out, files={"gsm8k.jsonl": bench})
    assert {p.name: p.read_bytes() for p in a.iterdir()} == {p.name: p.read_bytes() for p in b.iterdir()}
    record = json.loads((a / "suite.json").read_text())
    assert record["tasks"]["gsm8k"]["source"].startswith("gsm8k.jsonl sha256:")  # the path as configured
    suite = load_suite(a)
    assert [i.answer for i in suite["gsm8k"][1]] == ["0", "2", "4"] and suite["gsm8k"][0].match == "numeric"


def test_an_edited_task_file_is_caught_by_its_hash(micro_suite, tmp_path):
    import shutil

    out, _ = micro_suite
    copy = tmp_path / "suite"
    shutil.copytree(out, copy)
    path = copy / "math.jsonl"
    path.write_text(path.read_text().replace('"answer": "', '"answer": "9', 1))
    with pytest.raises(TaskFileError, match=f"{path}: does not match the sha256"):
        load_suite(copy)


# --- lm-eval ------------------------------------------------------------------------------------------


def _lm_eval_tasks(suite_dir: Path, dest: Path) -> Path:
    """The shipped task YAMLs, pointed at ``suite_dir`` instead of data/eval (and at the
    micro suite's generation budget)."""
    dest.mkdir(exist_ok=True)
    for path in LM_EVAL_TASKS.glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        file = Path(cfg["dataset_kwargs"]["data_files"]["test"]).name
        cfg["dataset_kwargs"]["data_files"]["test"] = str(suite_dir / file)
        if "generation_kwargs" in cfg:
            cfg["generation_kwargs"]["max_gen_toks"] = MICRO_MAX_TOKENS
        (dest / path.name).write_text(yaml.safe_dump(cfg))
    return dest


def test_lm_eval_scores_every_item_exactly_as_the_harness(micro_suite, lowered, micro_data, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from pipeline.eval.lm_eval_model import RecipeLM
    from pipeline.eval.run import evaluate_suite

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    suite_dir, _ = micro_suite
    tok = micro_data / "tokenizer" / "tokenizer.json"
    lm = RecipeLM(model=str(lowered["dir"] / "model.safetensors"), tokenizer=str(tok), batch_size="8")
    tasks = ["continuation", "code", "math", "worked_answer", "compare", "heldout_bpb"]
    out = simple_evaluate(
        model=lm,
        tasks=[f"mobilemoe_{t}" for t in tasks],
        task_manager=TaskManager(
            include_path=str(_lm_eval_tasks(suite_dir, tmp_path / "tasks")), include_defaults=False
        ),
        bootstrap_iters=0,
        log_samples=True,
    )
    ours = {r.spec.name: r for r in evaluate_suite(lm.scorer, {t: load_suite(suite_dir)[t] for t in tasks}, chat=False)}
    for task in tasks:
        # One sample per document and filter (math reports two readings of one generation).
        samples = sorted(out["samples"][f"mobilemoe_{task}"], key=lambda s: s["doc_id"])
        samples = list({s["doc_id"]: s for s in samples}.values())
        records = ours[task].items
        assert len(samples) == len(records) == MICRO_ITEMS[task]
        for sample, record in zip(samples, records):
            assert sample["doc"]["id"] == record["id"]
            if task == "math":
                assert sample["resps"][0][0] == record["output"]
            elif task == "heldout_bpb":
                assert sample["resps"][0][0] == pytest.approx(record["logprob"], rel=1e-5)
            else:
                theirs = [resp[0][0] for resp in sample["resps"]]
                assert theirs == pytest.approx(record["logprobs"], rel=1e-5)
    assert out["results"]["mobilemoe_continuation"]["acc,none"] == pytest.approx(ours["continuation"].metrics["acc"])


@pytest.mark.slow
def test_lm_eval_command_line_evaluates_a_recipe_checkpoint(micro_suite, lowered, micro_data, tmp_path):
    suite_dir, _ = micro_suite
    tok = micro_data / "tokenizer" / "tokenizer.json"
    cmd = [
        str(Path(sys.executable).parent / "mobilemoe-lm-eval"),
        "run",
        "--model",
        "mobilemoe",
        "--model_args",
        f"model={lowered['dir'] / 'model.safetensors'},tokenizer={tok}",
        "--include_path",
        str(_lm_eval_tasks(suite_dir, tmp_path / "tasks")),
        "--tasks",
        "mobilemoe_knowledge",
        "--output_path",
        str(tmp_path / "results"),
    ]
    env = {"PATH": "/usr/bin:/bin", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("results*.json")]
    assert results and 0.0 <= results[0]["results"]["mobilemoe_knowledge"]["acc,none"] <= 1.0
    assert "mobilemoe_knowledge" in proc.stdout  # the results table


# --- bad input through the stages' command line -------------------------------------------------


def _stage(stage: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.stages", stage, *args, "experiment=micro", "tracking.enabled=false"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": "/tmp"},
    )


def test_the_eval_stage_names_a_bad_item_with_its_file_and_line_before_any_work(micro_suite, micro_data, tmp_path):
    import shutil

    from pipeline.hashing import sha256_file

    suite_dir, _ = micro_suite
    copy = tmp_path / "suite"
    shutil.copytree(suite_dir, copy)
    task = copy / "code.jsonl"
    lines = task.read_text().splitlines()
    row = json.loads(lines[2])
    row["answer"] = len(row["choices"])  # out of range
    lines[2] = json.dumps(row)
    task.write_text("\n".join(lines) + "\n")
    record = json.loads((copy / "suite.json").read_text())
    record["tasks"]["code"]["sha256"] = sha256_file(task)  # edited as if built so: the item check must catch it
    (copy / "suite.json").write_text(json.dumps(record))
    before = {p: p.read_bytes() for p in copy.iterdir()}
    out = tmp_path / "out"
    proc = _stage(
        "eval_pretrain",
        f"stage.eval.suite={copy}",
        f"stage.eval.tokenizer={micro_data / 'tokenizer' / 'tokenizer.json'}",
        f"stage.eval.out_dir={out}",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"stage.eval.suite: {task}:3: answer index" in proc.stderr, proc.stderr[-2000:]
    assert {p: p.read_bytes() for p in copy.iterdir()} == before and not out.exists()


def test_the_evalsets_stage_names_a_benchmark_file_in_the_wrong_layout(tmp_path):
    bench = tmp_path / "gsm8k.jsonl"
    bench.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}) + "\n")
    proc = _stage(
        "evalsets",
        f"stage.evalsets.out_dir={tmp_path / 'suite'}",
        f"stage.evalsets.benchmarks=[{{layout: hellaswag, path: '{bench}'}}]",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"stage.evalsets.benchmarks[0]: {bench}:1: missing field" in proc.stderr, proc.stderr[-2000:]
    assert "hellaswag layout" in proc.stderr and not (tmp_path / "suite").exists()

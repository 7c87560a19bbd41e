"""Benchmark loaders: each public layout read from jsonl and parquet into the exact
zero-shot prompts, and every bad file reported by path, line (or row) and field."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.configbase import ConfigError
from pipeline.eval.benchmarks import LAYOUTS, load_benchmark
from pipeline.eval.tasks import ChoiceItem, GenerateItem, TaskFileError

HELLASWAG = [
    {
        "ind": 24,
        "activity_label": "Baking cookies",
        "ctx_a": "A woman mixes flour and sugar in a bowl.",
        "ctx_b": "she",
        "ctx": "A woman mixes flour and sugar in a bowl. she",
        "endings": [
            "pours the dough onto a tray.",
            "[header] Put the bowl away. [title] Wash it.",
            "throws the bowl  out the window.",
            "reads a book.",
        ],
        "label": "0",
    },
    {
        "ind": 31,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is on a roof.",
        "ctx_b": "he Fixes the SHINGLES",
        "endings": ["with a hammer.", "and sings.", "then sleeps.", "using a nail gun."],
        "label": 3,
    },
    {  # no ind, no ctx_a/ctx_b: the id is made from the row, the context from ctx
        "activity_label": "Running",
        "ctx": "[header] How to run fast [title] Warm up first.",
        "endings": ["Stretch your legs.", "Eat a cake.", "Sit down.", "Go to bed."],
        "label": "1",
    },
]

ARC = [
    {
        "id": "Mercury_123",
        "question": "Which gas do plants take in?",
        "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B",
    },
    {
        "id": "NYSEDREGENTS_2015_4_9",
        "question": "What melts ice?",
        "choices": {"text": ["heat", "cold", "dark"], "label": ["1", "2", "3"]},
        "answerKey": "1",
    },
    {
        "id": "Mercury_777",
        "question": "Which is a planet?",
        "choices": {"text": ["Moon", "Sun", "Comet", "Star", "Mars"], "label": ["A", "B", "C", "D", "E"]},
        "answerKey": "E",
    },
]

PIQA = [
    {"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Freeze the jar.", "label": 0},
    {"goal": "Dry wet socks.", "sol1": "Put them in water.", "sol2": "Hang them in the sun.", "label": 1},
]

MMLU = [
    {
        "question": "  What is 2 + 2?\n",
        "subject": "elementary_mathematics",
        "choices": ["3", "4", "5", "6"],
        "answer": 1,
    },
    {"question": "Which is a prime?", "subject": "college_mathematics", "choices": ["4", "6", "7", "9"], "answer": 2},
]

GSM8K = [
    {"question": "Ann has 3 apples and buys 2 more. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
    {"question": "A car costs $1,000 plus $250. Total?", "answer": "1000 + 250 = 1250\n#### 1,250 "},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def at(path, where):
    """A regex for the start of an error about ``where`` (a line number or 'row N') in ``path``."""
    return re.escape(f"{path}:{where}: " if isinstance(where, int) else f"{path}: {where} (0-based): ")


def test_hellaswag_prompts_clean_the_markup_and_capitalise_ctx_b(tmp_path):
    spec, items = load_benchmark("hellaswag", write_jsonl(tmp_path / "hs.jsonl", HELLASWAG))
    assert (spec.name, spec.kind, spec.domain, spec.chance) == ("hellaswag", "multiple_choice", "commonsense", 0.25)
    assert [i.id for i in items] == ["24", "31", "hellaswag/2"]
    assert items[0] == ChoiceItem(
        "24",
        "Baking cookies: A woman mixes flour and sugar in a bowl. She",
        (
            " pours the dough onto a tray.",
            "  Put the bowl away.. Wash it.",
            " throws the bowl out the window.",
            " reads a book.",
        ),
        0,
    )
    assert items[1].context == "Roof shingle removal: A man is on a roof. He fixes the shingles"
    assert items[1].answer == 3
    assert items[2].context == "Running: How to run fast. Warm up first."
    assert items[2].choices[0] == " Stretch your legs." and items[2].answer == 1


def test_arc_answer_key_letters_or_digits_and_chance_over_mixed_choice_counts(tmp_path):
    spec, items = load_benchmark("arc", write_jsonl(tmp_path / "arc.jsonl", ARC), name="arc_easy")
    assert (spec.name, spec.domain) == ("arc_easy", "science")
    assert spec.chance == pytest.approx((1 / 4 + 1 / 3 + 1 / 5) / 3)
    assert items[0] == ChoiceItem(
        "Mercury_123",
        "Question: Which gas do plants take in?\nAnswer:",
        (" oxygen", " carbon dioxide", " helium", " neon"),
        1,
    )
    assert (items[1].id, items[1].choices, items[1].answer) == ("NYSEDREGENTS_2015_4_9", (" heat", " cold", " dark"), 0)
    assert (items[2].answer, items[2].choices[4]) == (4, " Mars")


def test_piqa(tmp_path):
    spec, items = load_benchmark("piqa", write_jsonl(tmp_path / "piqa.jsonl", PIQA))
    assert (spec.kind, spec.domain, spec.chance) == ("multiple_choice", "commonsense", 0.5)
    assert items == [
        ChoiceItem("piqa/0", "Question: Open a jar.\nAnswer:", (" Twist the lid.", " Freeze the jar."), 0),
        ChoiceItem("piqa/1", "Question: Dry wet socks.\nAnswer:", (" Put them in water.", " Hang them in the sun."), 1),
    ]


def test_mmlu_lists_lettered_choices_and_answers_with_a_letter(tmp_path):
    rows = [MMLU[0], {**MMLU[1], "answer": "C"}]  # some copies store the answer as a letter
    spec, items = load_benchmark("mmlu", write_jsonl(tmp_path / "mmlu.jsonl", rows))
    assert (spec.domain, spec.chance) == ("knowledge", 0.25)
    assert items[0] == ChoiceItem(
        "mmlu/0",
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:",
        (" A", " B", " C", " D"),
        1,
    )
    assert items[1].context.startswith("The following are multiple choice questions (with answers) about college ma")
    assert items[1].answer == 2


def test_gsm8k_is_a_numeric_generate_task_with_the_number_after_the_marks(tmp_path):
    spec, items = load_benchmark("gsm8k", write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K))
    assert (spec.kind, spec.domain, spec.chance, spec.match) == ("generate", "math", 0.0, "numeric")
    assert (spec.until, spec.max_tokens) == (["Question:", "\n\n"], 256)
    assert items == [
        GenerateItem("gsm8k/0", "Question: Ann has 3 apples and buys 2 more. How many?\nAnswer:", "5"),
        GenerateItem("gsm8k/1", "Question: A car costs $1,000 plus $250. Total?\nAnswer:", "1250"),
    ]


@pytest.mark.parametrize("layout, rows", [("arc", ARC), ("mmlu", MMLU), ("hellaswag", HELLASWAG)])
def test_parquet_gives_the_same_items_as_jsonl(tmp_path, layout, rows):
    rows = [{**r, "label": str(r["label"])} for r in rows] if layout == "hellaswag" else rows  # one column type
    from_jsonl = load_benchmark(layout, write_jsonl(tmp_path / "b.jsonl", rows))
    from_parquet = load_benchmark(layout, write_parquet(tmp_path / "b.parquet", rows))
    assert from_parquet == from_jsonl
    assert all(isinstance(i.choices, tuple) and all(isinstance(c, str) for c in i.choices) for i in from_parquet[1])


def test_limit_keeps_the_first_items_and_reads_no_further(tmp_path):
    path = write_jsonl(tmp_path / "piqa.jsonl", PIQA)
    with path.open("a") as f:
        f.write("{not json\n")
    _, items = load_benchmark("piqa", path, limit=1)
    assert [i.id for i in items] == ["piqa/0"]
    assert len(load_benchmark("piqa", path, limit=2)[1]) == 2
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        load_benchmark("piqa", path, limit=0)


def test_missing_field_names_file_line_and_field(tmp_path):
    rows = [ARC[0], ARC[1], {k: v for k, v in ARC[2].items() if k != "answerKey"}]
    path = write_jsonl(tmp_path / "arc.jsonl", rows)
    with pytest.raises(TaskFileError, match=at(path, 3) + r"missing field 'answerKey' \(arc layout: id, question"):
        load_benchmark("arc", path)


def test_malformed_json_line(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    path.write_text(json.dumps(MMLU[0]) + "\n\n" + '{"question": "x",\n')
    with pytest.raises(TaskFileError, match=at(path, 3) + "not valid json"):
        load_benchmark("mmlu", path)


@pytest.mark.parametrize(
    "layout, rows, problem",
    [
        ("mmlu", [MMLU[0], {**MMLU[1], "answer": 4}], r"field 'answer' = 4 is out of range for 4 choices"),
        ("mmlu", [MMLU[0], {**MMLU[1], "answer": "E"}], r"field 'answer' must be an index or a letter, got 'E'"),
        ("piqa", [PIQA[0], {**PIQA[1], "label": -1}], r"field 'label' = -1 is out of range for 2 choices"),
        ("hellaswag", [HELLASWAG[0], {**HELLASWAG[1], "label": ""}], r"field 'label' is empty \(an unlabeled"),
        (
            "arc",
            [ARC[0], {**ARC[1], "answerKey": "A"}],
            r"field 'answerKey' = 'A' is not among the choice labels \['1', '2'",
        ),
        ("gsm8k", [GSM8K[0], {**GSM8K[1], "answer": "It is 1250."}], r"field 'answer' has no '#### <number>'"),
        ("arc", [ARC[0], ARC[0]], r"duplicate id 'Mercury_123' \(first at .*arc\.jsonl:1\)"),
    ],
)
def test_bad_answer_names_file_and_line(tmp_path, layout, rows, problem):
    path = write_jsonl(tmp_path / f"{layout}.jsonl", rows)
    with pytest.raises(TaskFileError, match=at(path, 2) + problem):
        load_benchmark(layout, path)


def test_parquet_errors_name_the_row(tmp_path):
    path = write_parquet(tmp_path / "arc.parquet", [ARC[0], {**ARC[0], "id": "x", "answerKey": "F"}])
    with pytest.raises(TaskFileError, match=at(path, "row 1") + "field 'answerKey' = 'F' is not among"):
        load_benchmark("arc", path)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(TaskFileError, match=re.escape(f"{broken}: not a readable parquet file")):
        load_benchmark("arc", broken)


@pytest.mark.parametrize("suffix, write", [(".jsonl", write_jsonl), (".parquet", write_parquet)])
def test_a_file_in_the_wrong_layout_fails_on_its_first_row(tmp_path, suffix, write):
    path = write(tmp_path / f"gsm8k{suffix}", GSM8K)
    where = 1 if suffix == ".jsonl" else "row 0"
    expected = at(path, where) + r"missing field 'activity_label' \(hellaswag layout: .*endings, label\)"
    with pytest.raises(TaskFileError, match=expected):
        load_benchmark("hellaswag", path)


def test_file_level_errors(tmp_path):
    csv = tmp_path / "arc.csv"
    csv.write_text("id,question\n")
    with pytest.raises(TaskFileError, match=re.escape(f"{csv}: unknown file type '.csv' (expected .jsonl, .json")):
        load_benchmark("arc", csv)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(TaskFileError, match=re.escape(f"{missing}: benchmark file not found")):
        load_benchmark("arc", missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TaskFileError, match=re.escape(f"{empty}: no items")):
        load_benchmark("arc", empty)
    not_object = write_jsonl(tmp_path / "list.json", [["a", "b"]])
    with pytest.raises(TaskFileError, match=at(not_object, 1) + "expected a json object, got list"):
        load_benchmark("piqa", not_object)


def test_unknown_layout_and_bad_name(tmp_path):
    path = write_jsonl(tmp_path / "piqa.jsonl", PIQA)
    assert LAYOUTS == ("hellaswag", "arc", "piqa", "mmlu", "gsm8k")
    with pytest.raises(
        ValueError, match=r"unknown benchmark layout 'squad' \(known: hellaswag, arc, piqa, mmlu, gsm8k\)"
    ):
        load_benchmark("squad", path)
    with pytest.raises(ConfigError, match="name: must be"):
        load_benchmark("piqa", path, name="PIQA-dev")

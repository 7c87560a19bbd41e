"""Sources: every kind yields documents; hf from local files; config errors name the key."""

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pipeline.configbase import ConfigError, from_dict  # noqa: E402
from pipeline.data.sources import DataError, SourceConfig, check_available, licence_of, materialise  # noqa: E402

SMALL = {
    "bible": ({}, 20),
    "fortunes": ({}, 200),
    "python_code": ({}, 50),
    "python_docs": ({}, 50),
    "arithmetic": ({"n_docs": 50}, None),
    "reasoning": ({"n_docs": 50}, None),
    "define": ({}, 20),
    "continue": ({"corpus": "fortunes"}, 20),
    "explain_code": ({}, 10),
    "math": ({"n_docs": 20}, None),
    "reason": ({"n_docs": 20}, None),
}


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_kind_yields_documents_with_domain_and_licence(kind):
    options, cap = SMALL[kind]
    cfg = SourceConfig(name=f"s_{kind}", kind=kind, domain="dom", max_docs=cap, options=options)
    docs = materialise(cfg)
    assert docs and (cap is None or len(docs) <= cap)
    assert all(d.text.strip() and d.domain == "dom" and d.source == f"s_{kind}" for d in docs)
    assert licence_of(cfg)
    if cfg.produces == "chat":
        for d in docs:
            roles = [m["role"] for m in d.meta["messages"]]
            assert roles[-1] == "assistant" and "user" in roles and d.meta["task"]


def test_generated_sources_are_deterministic_and_seeded():
    a = [d.text for d in materialise(SourceConfig(name="a", kind="arithmetic", options={"n_docs": 30}))]
    b = [d.text for d in materialise(SourceConfig(name="b", kind="arithmetic", options={"n_docs": 30}))]
    c = [d.text for d in materialise(SourceConfig(name="c", kind="arithmetic", options={"n_docs": 30, "seed": 9}))]
    assert a == b and a != c
    assert all("The answer is" in t for t in a)


def test_a_comparison_asked_either_way_is_one_problem_for_the_split():
    # "a or b" and "b or a" must fall on the same side of every split (training, the
    # eval suite's held-out band): their key is the unordered pair, not the wording.
    from pipeline.data import generated

    pairs = [(1.5, 3.25), (7.0, 0.125), (2.25, 2.5)]
    for a, b in pairs:
        ab, ba = generated.comparison(a, b), generated.comparison(b, a)
        assert ab.question != ba.question and ab.answer == ba.answer == str(max(a, b))
        assert generated.problem_key(ab) == generated.problem_key(ba)
    assert len({generated.problem_key(generated.comparison(a, b)) for a, b in pairs}) == len(pairs)
    # what the generator yields is built the same way; other topics key on their words
    found = list(generated.problems(generated.REASONING, 200, 5))
    assert all(p.identity for p in found if p.topic == "comparison")
    other = next(p for p in found if p.topic != "comparison")
    assert generated.problem_key(other) == "problem:" + " ".join(other.question.split())


def test_sft_tasks_include_multi_turn_conversations():
    docs = materialise(SourceConfig(name="m", kind="math", options={"n_docs": 200, "multi_turn": 0.5}))
    n_users = [sum(m["role"] == "user" for m in d.meta["messages"]) for d in docs]
    assert 1 in n_users and 2 in n_users


def test_python_docs_document_shape():
    docs = materialise(SourceConfig(name="d", kind="python_docs", max_docs=30))
    for d in docs:
        head = d.text.split("\n", 1)[0]
        assert "(" in head and d.key.startswith("py:") and d.meta["summary"]


def test_fortunes_skip_comment_and_separator_lines():
    docs = materialise(SourceConfig(name="f", kind="fortunes", options={"files": ["murphy"]}))
    assert all(not any(line.strip() == "%" or line.startswith("%%") for line in d.text.splitlines()) for d in docs)
    assert len(docs) > 100


def test_hf_json_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"document number {i}", "other": i} for i in range(7)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.table({"body": [r["text"] for r in rows]}), tmp_path / "d.parquet")
    js = SourceConfig(
        name="js", kind="hf", options={"path": "json", "data_files": str(tmp_path / "d.jsonl"), "licence": "CC0"}
    )
    pqc = SourceConfig(
        name="pq",
        kind="hf",
        max_docs=5,
        options={
            "path": "parquet",
            "data_files": [str(tmp_path / "d.parquet")],
            "text_field": "body",
            "licence": "CC0",
        },
    )
    assert [d.text for d in materialise(js)] == [r["text"] for r in rows]
    assert [d.text for d in materialise(pqc)] == [r["text"] for r in rows[:5]]
    assert licence_of(js) == "CC0"


def test_hf_chat_from_json(tmp_path):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(conv) + "\n")
    cfg = SourceConfig(
        name="c", kind="hf_chat", options={"path": "json", "data_files": str(tmp_path / "c.jsonl"), "licence": "CC0"}
    )
    [doc] = materialise(cfg)
    assert doc.meta["messages"] == conv["messages"]


def _hf(name: str, path, builder: str = "json", kind: str = "hf") -> SourceConfig:
    return SourceConfig(name=name, kind=kind, options={"path": builder, "data_files": str(path), "licence": "CC0"})


@pytest.mark.parametrize(
    "builder, content, cause",
    [
        ("json", b"", "the file is empty"),
        ("json", b"  \n\n", "the file is empty"),
        ("text", "caf\u00e9 au lait\n".encode("latin-1"), "not UTF-8 at byte 3 (line 1)"),
        ("json", b'{"text": "ok"}\n' + '{"text": "na\u00efve"}\n'.encode("latin-1"), "not UTF-8 at byte 27 (line 2)"),
        ("json", b'{"text": "a"}\n{"text": "b"}\n{"text": "c",\n', "malformed JSON at line 3"),
        ("parquet", b"not a parquet file at all", "not a Parquet file"),
    ],
)
def test_bad_local_files_name_source_file_and_cause(tmp_path, builder, content, cause):
    path = tmp_path / f"bad.{builder}"
    path.write_bytes(content)
    cfg = _hf("mine", path, builder)
    for probe in (check_available, materialise):  # the cheap check and the real read agree
        with pytest.raises(DataError) as err:
            probe(cfg)
        message = str(err.value)
        assert "'mine'" in message and str(path) in message and cause in message, message


def test_chat_ending_on_a_user_turn_keeps_its_answered_turns(tmp_path):
    from pipeline.data.mixing import MixtureConfig, collect

    def turn(role, text):
        return {"role": role, "content": text}

    rows = [
        {"messages": [turn("user", "2+2?"), turn("assistant", "4"), turn("user", "and 3+3?")]},  # trimmed
        {"messages": [turn("user", "hello?")]},  # nothing answered: dropped
        {"messages": [turn("user", "1+1?"), turn("assistant", "2")]},
    ] + [{"messages": [turn("user", f"q{i}"), turn("assistant", f"a{i}")]} for i in range(40)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _hf("chats", tmp_path / "c.jsonl", kind="hf_chat")
    docs = materialise(cfg)
    assert len(docs) == 42
    assert docs[0].meta["messages"] == rows[0]["messages"][:2] and docs[0].meta["trimmed_turns"] == 1
    assert "and 3+3?" not in docs[0].text
    mix = MixtureConfig(sources=[cfg], total_tokens=1000, val_fraction=0.1, kind="chat")
    [sd] = collect(mix).sources
    assert (sd.raw, sd.dropped, sd.trimmed) == (42, 1, 1)  # what the manifest reports
    # max_docs counts conversations that are used, not the dropped one.
    capped = SourceConfig(name="capped", kind="hf_chat", max_docs=2, options=cfg.options)
    assert [d.meta["messages"][0]["content"] for d in materialise(capped)] == ["2+2?", "1+1?"]


def test_hf_missing_text_field_and_missing_files(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    cfg = SourceConfig(
        name="nofield", kind="hf", options={"path": "json", "data_files": str(tmp_path / "d.jsonl"), "licence": "CC0"}
    )
    with pytest.raises(DataError, match="nofield.*'text'"):
        materialise(cfg)
    gone = SourceConfig(
        name="gone",
        kind="hf",
        options={"path": "json", "licence": "CC0", "data_files": str(tmp_path / "missing.jsonl")},
    )
    with pytest.raises(DataError, match="gone"):
        check_available(gone)


def test_wordnet_missing_names_path_and_package(tmp_path):
    cfg = SourceConfig(name="wn", kind="wordnet", options={"path": str(tmp_path)})
    with pytest.raises(DataError) as err:
        check_available(cfg)
    assert str(tmp_path / "data.noun") in str(err.value) and "wordnet-base" in str(err.value)


def test_wordnet_parses_data_files(tmp_path):
    line = "00001740 03 n 02 entity 0 thing 0 000 | that which is perceived to have its own existence\n"
    for pos in ("noun", "verb", "adj", "adv"):
        (tmp_path / f"data.{pos}").write_text("  1 This software and database is licensed\n" + line)
    docs = materialise(SourceConfig(name="wn", kind="wordnet", options={"path": str(tmp_path), "pos": ["noun"]}))
    assert [d.text for d in docs] == [
        "entity (noun): that which is perceived to have its own existence\nSynonyms: thing"
    ]


def test_empty_source_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "   "}) + "\n")
    cfg = SourceConfig(
        name="hollow",
        kind="hf",
        options={"path": "json", "licence": "CC0", "data_files": str(tmp_path / "empty.jsonl")},
    )
    with pytest.raises(DataError, match="source 'hollow' yielded no documents"):
        materialise(cfg)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"name": "x", "kind": "nope"}, r"^kind: unknown source kind 'nope'"),
        ({"name": "x", "kind": "bible", "weight": -1}, r"^weight: must be >= 0"),
        ({"name": "x", "kind": "bible", "colour": 1}, r"^colour: unknown key"),
        (
            {"name": "x", "kind": "bible", "options": {"chapters": 3}},
            r"^options\.chapters: unknown key \(known keys: books, verses_per_doc\) \(kind 'bible', source 'x'\)",
        ),
        ({"name": "x", "kind": "hf", "options": {"path": "json"}}, r"^options\.licence: required for kind 'hf'"),
        ({"name": "x", "kind": "arithmetic", "options": {"n_docs": "many"}}, r"^options\.n_docs: must be int"),
        ({"name": "x", "kind": "bible", "max_docs": 0}, r"^max_docs:"),
    ],
)
def test_bad_source_configs_name_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(SourceConfig, data)

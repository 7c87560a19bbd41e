"""build_all: outputs, metrics, validation before work, and atomic replacement."""

import json
import math
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pipeline.configbase import ConfigError, from_dict  # noqa: E402
from pipeline.data.build import build_all  # noqa: E402
from pipeline.data.mixing import MixtureConfig  # noqa: E402
from pipeline.data.sources import DataError  # noqa: E402
from pipeline.data.tokenizer import Tokenizer  # noqa: E402


def mix(kind, sources, total=15_000):
    return from_dict(
        MixtureConfig, {"total_tokens": total, "val_fraction": 0.1, "seed": 0, "kind": kind, "sources": sources}
    )


PRE = [
    {"name": "bible", "kind": "bible", "weight": 0.4, "domain": "books", "max_docs": 40},
    {"name": "code", "kind": "python_code", "weight": 0.3, "domain": "code", "max_docs": 150},
    {"name": "math", "kind": "arithmetic", "weight": 0.3, "domain": "math", "options": {"n_docs": 800}},
    {
        "name": "wn",
        "kind": "wordnet",
        "weight": 0.1,
        "domain": "knowledge",
        "optional": True,
        "options": {"path": "/nonexistent/wordnet"},
    },
]
SFT = [
    {"name": "math", "kind": "math", "domain": "math", "options": {"n_docs": 300, "seed": 1}},
    {"name": "define", "kind": "define", "domain": "knowledge", "max_docs": 150},
]


def configs(pre=PRE):
    return mix("text", pre), mix("text", PRE[1:3], 8_000), mix("chat", SFT, 8_000)


def test_build_all_outputs_and_metrics(tmp_path):
    out = tmp_path / "data"
    metrics = build_all(*configs(), vocab_size=600, out_dir=out, tokenizer_max_bytes=200_000)
    assert Tokenizer.load(out / "tokenizer" / "tokenizer.json").vocab_size == 600
    for role in ("pretrain", "midtrain", "sft"):
        manifest = json.loads((out / role / "manifest.json").read_text())
        assert manifest["totals"]["train"]["tokens"] == metrics["mixtures"][role]["train"]["tokens"] > 0
    assert (out / "sft" / "val_conversations.jsonl").stat().st_size > 0
    assert json.loads((out / "metrics.json").read_text()) == metrics
    p = metrics["pretrain"]
    assert 1 < p["val_unigram_entropy_bits"] <= math.log2(600)
    assert p["val_unigram_entropy_nats"] == pytest.approx(p["val_unigram_entropy_bits"] * 0.6931471805599453)
    assert p["val_unigram_xent_from_train_nats"] >= p["val_unigram_entropy_nats"] - 1e-9
    assert metrics["mixtures"]["pretrain"]["skipped_sources"] == ["wn"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temp dirs left behind


def test_rebuilding_from_the_same_inputs_gives_the_same_bytes(tmp_path):
    # DVC hashes these files: anything that varies between runs (seconds, hosts) in
    # them would make every downstream stage look changed.
    digests = []
    for name in ("a", "b"):
        build_all(*configs(PRE[:3]), vocab_size=600, out_dir=tmp_path / name, tokenizer_max_bytes=200_000)
        files = sorted(p for p in (tmp_path / name).rglob("*") if p.is_file())
        digests.append({str(p.relative_to(tmp_path / name)): p.read_bytes() for p in files})
    assert digests[0] == digests[1]
    assert "seconds" not in json.loads((tmp_path / "a" / "metrics.json").read_text())


def test_failed_build_leaves_previous_out_dir_untouched(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "marker.txt").write_text("old build")
    # Passes validation (the file exists) but fails while materialising: no 'text' field.
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    bad = PRE[:1] + [
        {
            "name": "bad",
            "kind": "hf",
            "options": {"path": "json", "licence": "CC0", "data_files": str(tmp_path / "bad.jsonl")},
        }
    ]
    with pytest.raises(DataError, match="'bad'"):
        build_all(*configs(bad), vocab_size=600, out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["marker.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "data"]


def test_unavailable_required_source_fails_before_any_work(tmp_path):
    missing = PRE[:1] + [{"name": "wn", "kind": "wordnet", "options": {"path": str(tmp_path / "nope")}}]
    with pytest.raises(DataError, match=r"pretrain\.sources\[1\].*wordnet-base"):
        build_all(*configs(missing), vocab_size=600, out_dir=tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_wrong_mixture_kind_and_vocab(tmp_path):
    pre, mid, sft = configs()
    with pytest.raises(ConfigError, match=r"^sft\.kind: must be 'chat'"):
        build_all(pre, mid, mid, vocab_size=600, out_dir=tmp_path / "d")
    with pytest.raises(ConfigError, match=r"^vocab_size:"):
        build_all(pre, mid, sft, vocab_size=10, out_dir=tmp_path / "d")

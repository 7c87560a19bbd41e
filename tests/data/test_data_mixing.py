"""Mixtures: determinism, dedup before split, no train/val overlap, weights, errors."""

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pipeline.configbase import ConfigError, from_dict  # noqa: E402
from pipeline.data.mixing import MixtureConfig, build_mixture, collect, load_split, train_tokenizer_on_mixture  # noqa: E402
from pipeline.data.sources import DataError, SourceConfig  # noqa: E402


def text_mix(**over):
    d = {
        "total_tokens": 40_000,
        "val_fraction": 0.1,
        "seed": 3,
        "kind": "text",
        "sources": [
            {"name": "fortunes", "kind": "fortunes", "weight": 0.7, "domain": "web", "max_docs": 1500},
            {"name": "math", "kind": "arithmetic", "weight": 0.3, "domain": "math", "options": {"n_docs": 1500}},
        ],
    }
    d.update(over)
    return from_dict(MixtureConfig, d, where="data.pretrain")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer_on_mixture(collect(text_mix()), 512, max_bytes=300_000)


def split_docs(tokens, bos):
    cuts = np.flatnonzero(np.asarray(tokens) == bos)
    return [tuple(np.asarray(tokens[a:b]).tolist()) for a, b in zip(cuts, list(cuts[1:]) + [len(tokens)])]


def test_same_seed_same_files_other_seed_differs(tok, tmp_path):
    a = build_mixture(text_mix(), tok, tmp_path / "a")
    b = build_mixture(text_mix(), tok, tmp_path / "b")
    c = build_mixture(text_mix(seed=4), tok, tmp_path / "c")
    assert a["files"] == b["files"]
    assert a["files"]["train_tokens.npy"]["sha256"] != c["files"]["train_tokens.npy"]["sha256"]
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["files"] == a["files"]


def test_files_shape_dtype_and_mask(tok, tmp_path):
    m = build_mixture(text_mix(), tok, tmp_path)
    for split in ("train", "val"):
        tokens, mask = load_split(tmp_path, split)
        assert tokens.dtype == np.uint32 and mask.dtype == np.uint8 and tokens.shape == mask.shape
        assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
        assert (mask[tokens == tok.bos_id] == 0).all() and (mask[tokens != tok.bos_id] == 1).all()
        assert len(tokens) == m["totals"][split]["tokens"]
    assert abs(m["totals"]["train"]["tokens"] - 40_000) < 1_000


def test_weights_achieved_and_repetition_recorded(tok, tmp_path):
    m = build_mixture(text_mix(), tok, tmp_path)
    for s in m["sources"].values():
        assert abs(s["weight_achieved"] - s["weight_requested"]) < 0.02
    # a tiny source must be repeated to reach its share, and that is recorded
    sources = [
        {"name": "fortunes", "kind": "fortunes", "weight": 0.5, "max_docs": 3000},
        {"name": "tiny", "kind": "arithmetic", "weight": 0.5, "options": {"n_docs": 300}},
    ]
    m = build_mixture(text_mix(total_tokens=60_000, sources=sources), tok, tmp_path / "small")
    tiny = m["sources"]["tiny"]
    assert tiny["repetition"] > 1.5 and abs(tiny["weight_achieved"] - 0.5) < 0.03
    capped = build_mixture(text_mix(total_tokens=60_000, max_repeat=1.0, sources=sources), tok, tmp_path / "cap")
    assert capped["sources"]["tiny"]["weight_achieved"] < 0.35 and capped["warnings"]


def test_dedup_before_split_and_no_overlap(tok, tmp_path):
    texts = [f"unique line {i} about foxes" for i in range(300)]
    rows = texts + texts[:100] + [t.replace(" ", "   ") for t in texts[100:150]]  # exact + whitespace dups
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in rows))
    other = texts[:50] + [f"another line {i} about dogs" for i in range(40)]
    (tmp_path / "e.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in other))
    cfg = text_mix(
        total_tokens=8_000,
        val_fraction=0.3,
        sources=[
            {
                "name": "dups",
                "kind": "hf",
                "options": {"path": "json", "data_files": str(tmp_path / "d.jsonl"), "licence": "CC0"},
            },
            {
                "name": "again",
                "kind": "hf",
                "weight": 0.2,
                "options": {"path": "json", "data_files": str(tmp_path / "e.jsonl"), "licence": "CC0"},
            },
        ],
    )
    m = build_mixture(cfg, tok, tmp_path / "out")
    assert m["sources"]["dups"]["duplicates_removed"] == 150
    assert m["sources"]["again"]["duplicates_removed"] == 50  # all already seen in 'dups'
    train = set(split_docs(load_split(tmp_path / "out", "train")[0], tok.bos_id))
    val = set(split_docs(load_split(tmp_path / "out", "val")[0], tok.bos_id))
    assert train and val and not (train & val)


def test_split_is_stable_across_mixtures(tok, tmp_path):
    a = collect(text_mix())
    b = collect(text_mix(seed=99, sources=[{"name": "x", "kind": "fortunes", "max_docs": 1500}]))
    assert {d.text for d in a.sources[0].val} == {d.text for d in b.sources[0].val}


def test_chat_mixture_writes_mask_and_val_conversations(tok, tmp_path):
    cfg = from_dict(
        MixtureConfig,
        {
            "total_tokens": 20_000,
            "val_fraction": 0.2,
            "kind": "chat",
            "sources": [
                {"name": "math", "kind": "math", "options": {"n_docs": 400}},
                {"name": "cont", "kind": "continue", "options": {"corpus": "fortunes"}, "max_docs": 300},
            ],
        },
    )
    m = build_mixture(cfg, tok, tmp_path)
    tokens, mask = load_split(tmp_path, "train")
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    # targets never include role markers, bos or eos; every assistant <|end|> is a target
    for special in (tok.bos_id, tok.eos_id, tok.user_id, tok.assistant_id, tok.system_id):
        assert not mask[tokens == special].any()
    assert 0 < mask.mean() < 1 and m["totals"]["train"]["target_tokens"] == int(mask.sum())
    rows = [json.loads(l) for l in (tmp_path / "val_conversations.jsonl").read_text().splitlines()]
    assert len(rows) == m["totals"]["val"]["documents"] and {r["task"] for r in rows} <= {"math", "continue"}
    train_keys = {d.split_key() for sd in collect(cfg).sources for d in sd.train}
    assert not ({r["key"] for r in rows} & train_keys)


def test_load_split_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tokens.npy"):
        load_split(tmp_path, "train")


@pytest.mark.parametrize(
    "over, match",
    [
        ({"sources": [{"name": "a", "kind": "bible", "weight": 0}]}, r"^data\.pretrain\.sources: weights sum to 0"),
        (
            {"sources": [{"name": "a", "kind": "bible", "weight": -0.5}]},
            r"^data\.pretrain\.sources\[0\]\.weight: must be >= 0",
        ),
        (
            {"sources": [{"name": "a", "kind": "bible"}, {"name": "a", "kind": "fortunes"}]},
            r"^data\.pretrain\.sources\[1\]\.name: duplicate",
        ),
        (
            {"sources": [{"name": "a", "kind": "math"}]},
            r"^data\.pretrain\.sources\[0\]\.kind: kind 'math' produces chat",
        ),
        (
            {"sources": [{"name": "a", "kind": "bible", "flavour": 1}]},
            r"^data\.pretrain\.sources\[0\]\.flavour: unknown key",
        ),
        ({"val_fraction": 0.5}, r"^data\.pretrain\.val_fraction"),
        ({"total_tokens": 0}, r"^data\.pretrain\.total_tokens"),
        ({"kind": "audio"}, r"^data\.pretrain\.kind"),
        ({"mixer": "x"}, r"^data\.pretrain\.mixer: unknown key"),
    ],
)
def test_bad_mixture_configs(over, match):
    with pytest.raises(ConfigError, match=match):
        text_mix(**over)


def test_optional_unavailable_source_is_skipped_and_recorded(tok, tmp_path):
    cfg = MixtureConfig(
        sources=text_mix().sources
        + [SourceConfig(name="wn", kind="wordnet", optional=True, options={"path": str(tmp_path / "none")})],
        total_tokens=40_000,
    )
    m = build_mixture(cfg, tok, tmp_path / "o")
    assert [s["name"] for s in m["skipped_sources"]] == ["wn"] and "wordnet-base" in m["warnings"][0]
    required = text_mix(sources=[{"name": "wn", "kind": "wordnet", "options": {"path": str(tmp_path / "none")}}])
    with pytest.raises(DataError, match="wordnet-base"):
        collect(required)

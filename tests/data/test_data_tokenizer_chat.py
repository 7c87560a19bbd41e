"""Byte-level BPE roundtrip and the chat template's loss mask."""

import pytest

from pipeline.data.chat import render, render_many, render_prompt, render_text
from pipeline.data.tokenizer import SPECIAL_TOKENS, Tokenizer, fingerprint

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "In the beginning God created the heaven and the earth.",
    "12 + 30 = 42. The answer is 42.",
] * 40


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, 400)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "  two  spaces\n\ttab\r\n",
        "naïve café 日本語 😀",
        "\x00\x07 control",
        "<|end|> looks special <|bos|>",
    ],
)
def test_roundtrip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_token_strings_in_text_are_not_special(tok):
    ids = tok.encode("a <|end|> b")
    assert tok.end_id not in ids and tok.decode(ids) == "a <|end|> b"


def test_special_ids_distinct_and_save_load(tok, tmp_path):
    ids = [tok.special_ids[t] for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tok.vocab_size == 400
    path = tok.save(tmp_path / "tok")
    again = Tokenizer.load(path)
    assert again.encode("The quick fox") == tok.encode("The quick fox")
    assert fingerprint(again) == fingerprint(tok)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.load(tmp_path / "nowhere" / "tokenizer.json")


def test_vocab_too_small_is_config_error():
    from pipeline.configbase import ConfigError

    with pytest.raises(ConfigError, match="^vocab_size:"):
        Tokenizer.train(CORPUS, 100)


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "8, the <|end|> of it."},
]


def test_loss_mask_is_exactly_assistant_content_and_end(tok):
    ids, mask = render(CONV, tok)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id and mask[0] == 0
    masked = [i for i, m in zip(ids, mask) if m]
    expected = "2 + 2 = 4.<|end|>8, the <|end|> of it.<|end|>"
    assert tok.decode(masked) == expected
    # exactly two real end tokens are targets: the assistant turns' closers
    assert sum(1 for i, m in zip(ids, mask) if m and i == tok.end_id) == 2
    # role markers, system and user turns are never targets
    for i, m in zip(ids, mask):
        if i in (tok.system_id, tok.user_id, tok.assistant_id, tok.bos_id):
            assert m == 0
    unmasked = tok.decode(i for i, m in zip(ids, mask) if not m)
    assert "What is 2+2?" in unmasked and "Be brief." in unmasked and "2 + 2 = 4." not in unmasked


def test_render_many_matches_render(tok):
    convs = [CONV, CONV[1:3]]
    assert render_many(convs, tok) == [render(c, tok) for c in convs]


def test_render_prompt_and_text(tok):
    prompt = render_prompt(CONV[:4], tok)
    full, _ = render(CONV, tok)
    assert prompt[-1] == tok.assistant_id and full[: len(prompt)] == prompt
    with pytest.raises(ValueError, match="last message must be from the user"):
        render_prompt(CONV[:3], tok)
    assert render_text(CONV[1:3]) == "<|user|>What is 2+2?<|end|><|assistant|>2 + 2 = 4.<|end|>"


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\]\.role: unknown role"),
        ([{"role": "assistant", "content": "x"}], r"messages\[0\]\.role: expected 'user'"),
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], r"messages\[1\]\.role: 'system'"),
    ],
)
def test_bad_conversations(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        render(messages, tok)

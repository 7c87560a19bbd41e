"""The one chat template, and its loss mask.

Layout (role and end markers are single special tokens, inserted by id)::

    <|bos|> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> ...

Loss mask convention (shared with the pre-training files): ``mask[i] == 1`` means token
``i`` is a prediction target, i.e. the loss of predicting token ``i`` from tokens
``< i`` counts. In chat data exactly the assistant's content tokens and the
assistant's closing ``<|end|>`` are targets, so the model learns to answer and to stop,
never to imitate the user.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pipeline.data.tokenizer import ASSISTANT, END, SYSTEM, USER, Tokenizer

ROLES = ("system", "user", "assistant")
_MARK = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def validate(messages: Sequence[Mapping[str, str]]) -> None:
    """Roles known, contents strings, system only first, user and assistant alternate."""
    if not messages:
        raise ValueError("conversation is empty")
    expected = "user"
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role: unknown role {role!r} (known: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content: must be a string")
        if role == "system":
            if i != 0:
                raise ValueError(f"messages[{i}].role: 'system' is only allowed first")
            continue
        if role != expected:
            raise ValueError(f"messages[{i}].role: expected {expected!r}, got {role!r}")
        expected = "assistant" if role == "user" else "user"


def render(
    messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer, add_bos: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids of a whole conversation and its loss mask (same length)."""
    validate(messages)
    bodies = [tokenizer.encode(m["content"]) for m in messages]
    return _assemble(messages, bodies, tokenizer, add_bos)


def render_many(
    conversations: Sequence[Sequence[Mapping[str, str]]], tokenizer: Tokenizer, add_bos: bool = True
) -> list[tuple[list[int], list[int]]]:
    """:func:`render` for many conversations, encoding all contents in one batch."""
    for messages in conversations:
        validate(messages)
    bodies = iter(tokenizer.encode_batch([m["content"] for msgs in conversations for m in msgs]))
    return [_assemble(msgs, [next(bodies) for _ in msgs], tokenizer, add_bos) for msgs in conversations]


def _assemble(messages, bodies, tokenizer: Tokenizer, add_bos: bool) -> tuple[list[int], list[int]]:
    ids: list[int] = [tokenizer.bos_id] if add_bos else []
    mask: list[int] = [0] * len(ids)
    for m, body in zip(messages, bodies):
        target = 1 if m["role"] == "assistant" else 0
        ids += [tokenizer.special_ids[_MARK[m["role"]]], *body, tokenizer.end_id]
        mask += [0] + [target] * (len(body) + 1)
    return ids, mask


def render_prompt(messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer, add_bos: bool = True) -> list[int]:
    """Ids for generation: the conversation so far (ending in a user turn), then
    ``<|assistant|>``; generation should stop at ``<|end|>``."""
    validate(messages)
    if messages[-1]["role"] != "user":
        raise ValueError("render_prompt: the last message must be from the user")
    ids, _ = render(messages, tokenizer, add_bos=add_bos)
    return ids + [tokenizer.assistant_id]


def render_text(messages: Sequence[Mapping[str, str]]) -> str:
    """Human-readable form with the same markers (for display and logs, not training)."""
    validate(messages)
    return "".join(f"{_MARK[m['role']]}{m['content']}{END}" for m in messages)

"""Answer held-out chat prompts with a trained model: a readable check after SFT.

For each task type in the SFT mixture's held-out conversations, take the first user
turn of ``per_task`` conversations, generate greedily up to ``<|end|>``, and record the
prompt, the model's answer and the reference answer side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.data.chat import render_prompt
from pipeline.data.tokenizer import Tokenizer
from pipeline.model import Transformer, generate


def heldout_prompts(mixture_dir: Path, per_task: int) -> list[dict]:
    path = Path(mixture_dir) / "val_conversations.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: held-out conversations are missing (an SFT mixture writes them)")
    chosen: dict[str, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        task = row.get("task") or row["source"]
        if len(chosen.setdefault(task, [])) < per_task:
            chosen[task].append(row)
    return [row for rows in chosen.values() for row in rows]


@torch.no_grad()
def answer_heldout(
    model: Transformer, tokenizer: Tokenizer, mixture_dir: Path, per_task: int, max_len: int, max_new_tokens: int = 64
) -> list[dict]:
    samples = []
    for row in heldout_prompts(mixture_dir, per_task):
        messages = row["messages"]
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        prompt = messages[: first_user + 1]
        reference = next((m["content"] for m in messages[first_user + 1 :] if m["role"] == "assistant"), "")
        ids = render_prompt(prompt, tokenizer)[-max(1, max_len - max_new_tokens) :]
        new = generate(model, torch.tensor([ids]), max_new_tokens=max_new_tokens, eos_id=tokenizer.end_id)
        answer_ids = [t for t in new[0].tolist() if t != tokenizer.end_id]
        samples.append(
            {
                "task": row.get("task") or row["source"],
                "prompt": prompt[-1]["content"],
                "answer": tokenizer.decode(answer_ids, skip_special=True),
                "reference": reference,
            }
        )
    return samples

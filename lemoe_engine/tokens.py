"""Joint tokenisation of (prompt, answer) pairs and their padded batches.

Shared by training (editor) and scoring (evaluation), so both see exactly the same tokens
and the same prompt mask (the positions the sequence route is pooled over).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class EncodedPair:
    ids: list[int]      # full teacher-forced sequence (special prefix + prompt + answer)
    prompt_len: int     # number of leading tokens that belong to the prompt (>= 1)


def special_prefix(tokenizer) -> list[int] | None:
    """Tokens the tokenizer puts in front of a text (BOS), found by encoding a probe with and
    without special tokens.  The texts are then encoded without special tokens and this prefix is
    prepended: the model sees its BOS, and a suffix the tokenizer may append (EOS) is left out, as
    it is no part of the answer.  None when the probe's plain tokens cannot be located inside the
    special encoding (then the special encodings are used as they are)."""
    probe = "The answer is"
    with_sp = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    n = len(plain)
    for i in range(len(with_sp) - n + 1):
        if with_sp[i:i + n] == plain:
            return with_sp[:i]
    return None


def encode_pairs(tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> list[EncodedPair]:
    """Joint tokenisation of ``prompt + " " + answer``; the prompt part is the prompt's tokens.

    With a byte-level BPE whose pre-tokenizer splits before a space (GPT-2 / SmolLM2 / LLaMA-3
    style) the prompt's own tokens are a prefix of the joint tokens: the space starts a new
    pre-token, so no merge crosses the boundary.  Checked on the SmolLM2 tokenizer over 289
    prompt/answer pairs (punctuation, digits, accents, emoji, newlines): always a prefix, except
    when the prompt ENDS in whitespace and the answer STARTS with whitespace ("line\\n" + " " +
    "  two" -> "ĊĠĠ" merges across the boundary).  Then, and for tokenizers without that split,
    the prompt part is the longest common prefix of the two encodings, and the token that
    straddles the boundary is scored as an answer token (the model has to produce it after the
    shorter prompt).
    """
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers differ in length")
    prefix = special_prefix(tokenizer)
    use_special = prefix is None
    prefix = prefix or []
    joint_texts = [p + " " + a for p, a in zip(prompts, answers)]
    p_ids = tokenizer(list(prompts), add_special_tokens=use_special)["input_ids"]
    j_ids = tokenizer(joint_texts, add_special_tokens=use_special)["input_ids"]
    out: list[EncodedPair] = []
    for k, (p, j) in enumerate(zip(p_ids, j_ids)):
        p = prefix + list(p)
        j = prefix + list(j)
        n = 0
        limit = min(len(p), len(j))
        while n < limit and p[n] == j[n]:
            n += 1
        if n == 0:
            raise ValueError(
                f"prompt {prompts[k]!r} has no tokens before its answer (the tokenizer adds no "
                "BOS), so the first answer token cannot be scored")
        if n >= len(j):
            raise ValueError(f"answer {answers[k]!r} for prompt {prompts[k]!r} has no tokens")
        out.append(EncodedPair(ids=j, prompt_len=n))
    return out


def collate(rows: Sequence[EncodedPair], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``prompt_mask`` ([B, T] each)."""
    length = max(len(r.ids) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    prompt_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, :len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        attention[b, :len(r.ids)] = 1
        prompt_mask[b, :r.prompt_len] = 1
    return input_ids.to(device), attention.to(device), prompt_mask.to(device)


def pad_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else 0 (padded positions are masked out
    and never scored, so any id works)."""
    value = getattr(tokenizer, "pad_token_id", None)
    return value if value is not None else 0


def supervised_batches(tokenizer, prompts: Sequence[str], answers: Sequence[str], micro_batch: int,
                       device, end_token: int | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Training micro-batches ``(ids, attention, prompt_mask, labels)`` of the pairs; labels are
    the answer tokens (and ``end_token`` after each answer, when given), -100 elsewhere."""
    rows = encode_pairs(tokenizer, prompts, answers)
    if end_token is not None:
        rows = [EncodedPair(ids=row.ids + [end_token], prompt_len=row.prompt_len) for row in rows]
    batches = []
    for start in range(0, len(rows), micro_batch):
        ids, attention, prompt_mask = collate(rows[start:start + micro_batch], pad_id(tokenizer), device)
        labels = ids.masked_fill((prompt_mask == 1) | (attention == 0), -100)
        batches.append((ids, attention, prompt_mask, labels))
    return batches

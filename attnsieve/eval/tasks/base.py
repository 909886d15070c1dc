"""What every task produces, how prompts reach an exact token length, and RULER-style scoring."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sample:
    task: str
    length: int  # exact prompt length in tokens
    depth: float  # where the needle sits, as a fraction of the haystack
    seed: int
    input_ids: torch.Tensor  # [1, length]
    answers: list[str]  # strings the output must contain (partial credit: fraction found)
    max_new_tokens: int = 8
    meta: dict = field(default_factory=dict)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def build_prompt(tok, *, head: str, needle: str, question: str, filler: str, length: int, depth: float) -> list[int]:
    """Token ids of head + filler[:a] + needle + filler[:b] + question, exactly `length` long.

    Pieces are tokenised separately and concatenated as ids, so the length is exact for the
    model's tokenizer; the filler is cut at token granularity to fill the space.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    head_ids, needle_ids, q_ids = encode(tok, head), encode(tok, needle), encode(tok, question)
    room = length - len(bos) - len(head_ids) - len(needle_ids) - len(q_ids)
    if room < 0:
        raise ValueError(f"length {length} is too short for this task (needs > {length - room} tokens)")
    unit = encode(tok, filler)
    hay = (unit * (room // len(unit) + 1))[:room]
    cut = int(round(depth * room))
    ids = bos + head_ids + hay[:cut] + needle_ids + hay[cut:] + q_ids
    assert len(ids) == length
    return ids


def score_contains(output: str, answers: list[str]) -> float:
    """RULER's string-match score: the fraction of expected answers found in the output."""
    if not answers:
        return 0.0
    return sum(a in output for a in answers) / len(answers)

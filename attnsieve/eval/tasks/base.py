"""What every task produces, how prompts reach an exact token length, and RULER-style scoring.

A prompt is head + haystack with needles inserted + question, each piece tokenised on its own and
concatenated as ids, so its length is exact for the model's tokenizer; the haystack is cut at token
granularity to fill the space. A needle's depth is its position as a fraction of the haystack:
0 puts it right after the head, 1 right before the question. In the "prose" haystack a needle
moves to the nearest sentence start if one lies within SNAP of the haystack's length (RULER
inserts needles between an essay's sentences); otherwise, and always in "repeat", it goes at the
exact token, even mid-word.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from attnsieve.eval.tasks.haystack import haystack_with_starts, repeat_ids

SNAP = 0.02  # farthest a needle moves to reach a sentence start, as a fraction of the haystack


@dataclass
class Sample:
    task: str
    length: int  # exact prompt length in tokens
    depth: float  # where the (first) needle sits, as a fraction of the haystack
    seed: int
    input_ids: torch.Tensor  # [1, length]
    answers: list[str]  # strings the output must contain (partial credit: fraction found)
    max_new_tokens: int = 8
    meta: dict = field(default_factory=dict)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def bos_ids(tok) -> list[int]:
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")


def spread_depths(depth: float, n: int) -> list[float]:
    """Depths of n needles: the first at `depth`, the others evenly spaced after it, in order, before 1."""
    check_depth(depth)
    return [depth + (1.0 - depth) * k / n for k in range(n)]


def too_short(length: int, needed: int) -> ValueError:
    return ValueError(f"length {length} is too short for this task (needs at least {needed} tokens)")


def _snap(cut: int, starts: list[int], room: int) -> int:
    """The sentence start (or the haystack's end) nearest to `cut`, if within SNAP * room of it."""
    i = bisect.bisect_left(starts, cut)
    near = min(starts[max(i - 1, 0) : i + 1] + [room], key=lambda s: abs(s - cut))
    return near if abs(near - cut) <= SNAP * room else cut


def _assemble(tok, head: str, needles: list[str], question: str, length: int, depths: list[float],
              hay: Callable[[int], tuple[list[int], list[int]]]) -> list[int]:
    if len(needles) != len(depths):
        raise ValueError(f"got {len(needles)} needles but {len(depths)} depths")
    for d in depths:
        check_depth(d)
    head_ids, q_ids = bos_ids(tok) + encode(tok, head), encode(tok, question)
    needle_ids = [encode(tok, n) for n in needles]
    room = length - len(head_ids) - len(q_ids) - sum(map(len, needle_ids))
    if room < 0:
        raise too_short(length, length - room)
    filler, starts = hay(room)
    cuts = [_snap(round(d * room), starts, room) for d in depths]
    ids, prev = list(head_ids), 0
    for i in sorted(range(len(needles)), key=lambda i: (cuts[i], i)):
        ids += filler[prev : cuts[i]] + needle_ids[i]
        prev = cuts[i]
    ids += filler[prev:] + q_ids
    if len(ids) != length:  # internal invariant of the construction above
        raise RuntimeError(f"built {len(ids)} tokens, expected {length}")
    return ids


def build_prompt(tok, *, head: str, needle: str, question: str, filler: str, length: int, depth: float) -> list[int]:
    """Token ids of head + filler[:a] + needle + filler[a:] + question, exactly `length` long.

    `filler` is a literal text, tokenised once and repeated (see `build_prompt_multi` for the named
    haystacks); the needle sits at exactly `depth` of the filler.
    """
    return _assemble(tok, head, [needle], question, length, [depth], lambda n: (repeat_ids(tok, filler, n), []))


def build_prompt_multi(tok, *, head: str, needles: list[str], question: str, haystack_kind: str, seed: int,
                       length: int, depths: list[float]) -> list[int]:
    """Token ids of head + haystack with `needles[i]` at `depths[i]` + question, exactly `length` long.

    The haystack is `haystack_ids(tok, haystack_kind, ..., seed)`; each needle moves to a sentence
    start within SNAP of its depth if there is one. Needles at the same place keep their list order.
    """
    return _assemble(tok, head, needles, question, length, depths,
                     lambda n: haystack_with_starts(tok, haystack_kind, n, seed))


def answer_budget(tok, answers: list[str]) -> int:
    """max_new_tokens for a task: the answers' own tokens plus 8 per answer for the words around them."""
    return len(encode(tok, " " + ", ".join(answers))) + 8 * len(answers)


def score_contains(output: str, answers: list[str]) -> float:
    """RULER's string-match score: the fraction of expected answers found in the output."""
    if not answers:
        return 0.0
    return sum(a in output for a in answers) / len(answers)

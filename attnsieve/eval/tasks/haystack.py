"""Haystacks: the filler text long-context tasks hide their needles in, as token ids of an exact length.

Two kinds, both offline. "repeat" is the repetitive noise of the pass-key test (Mohtashami & Jaggi,
arXiv:2305.16300), which RULER (Hsieh et al., arXiv:2404.06654) calls the "noise" haystack.
"prose" is natural English: RULER uses Paul Graham's essays, which would need a download, so we
use CPython's own documentation, `pydoc_data.topics.topics`, present on every Python install. Its
text changes between Python versions, so "prose" prompts are reproducible for one Python minor
version, not across versions.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

HAYSTACKS = ("repeat", "prose")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def check_haystack(kind: str) -> None:
    if kind not in HAYSTACKS:
        raise ValueError(f"unknown haystack kind {kind!r}; allowed: {', '.join(HAYSTACKS)}")


@lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
    """The pydoc topics, in sorted-key order, whitespace-normalised and split into sentences."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    text = re.sub(r"([*=~^-])\1{2,}", " ", text)  # reST heading underlines are not prose
    text = " ".join(text.split())
    return tuple(re.split(r"(?<=[.!?]) (?=[A-Z])", text))


@lru_cache(maxsize=2)
def source_text(kind: str) -> str:
    """All text a haystack kind can draw from; tasks pick keys and values that never occur in it."""
    check_haystack(kind)
    return FILLER if kind == "repeat" else " ".join(prose_sentences())


def repeat_ids(tok, text: str, n_tokens: int) -> list[int]:
    """`text` tokenised once and repeated, cut to exactly `n_tokens` ids."""
    unit = _unit_ids(tok, text)
    return list(unit * (n_tokens // len(unit) + 1))[:n_tokens]


@lru_cache(maxsize=8)
def _unit_ids(tok, text: str) -> tuple[int, ...]:
    unit = tuple(tok(text, add_special_tokens=False)["input_ids"])
    if not unit:
        raise ValueError(f"filler {text!r} tokenises to nothing")
    return unit


@lru_cache(maxsize=8)
def _prose_ids(tok) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The prose sentences as ids, each tokenised on its own with a leading space, and where each one starts."""
    pieces = tok([" " + s for s in prose_sentences()], add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    starts = []
    for piece in pieces:
        starts.append(len(ids))
        ids.extend(piece)
    return tuple(ids), tuple(starts)


def haystack_with_starts(tok, kind: str, n_tokens: int, seed: int) -> tuple[list[int], list[int]]:
    """`haystack_ids` and the indices in it where a prose sentence starts (where a needle reads naturally).

    "repeat" reports none: needles go at the exact token, even mid-sentence, as in the original
    pass-key prompt, which stays unchanged. (A variant with the filler tokenised per sentence and
    the needle at a sentence start let the embedded model find 3 of 6 pass keys at 2048 tokens
    with dense attention, against 6 of 6 for the original.)
    """
    check_haystack(kind)
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    if kind == "repeat":
        return repeat_ids(tok, FILLER, n_tokens), []
    ids, starts = _prose_ids(tok)
    pos = random.Random(f"prose-{seed}").choice(starts)
    out: list[int] = []
    out_starts: list[int] = []
    while len(out) < n_tokens:
        out_starts += [len(out) + s - pos for s in starts if pos <= s < pos + n_tokens - len(out)]
        out.extend(ids[pos : pos + n_tokens - len(out)])
        pos = 0
    return out, out_starts


def haystack_ids(tok, kind: str, n_tokens: int, seed: int) -> list[int]:
    """Exactly `n_tokens` ids of haystack `kind` for tokenizer `tok`, cut at token granularity.

    "repeat" is FILLER tokenised once and repeated, and ignores `seed`. "prose" is the pydoc
    sentences, each tokenised on its own with a leading space and concatenated as ids; it starts at
    a seed-chosen sentence and wraps around to the first topic when it runs out (the whole text is
    ~100k tokens for a 256k-vocabulary tokenizer). Its tokenisation is cached per tokenizer, so
    only the first call per tokenizer is slow (~0.1 s).
    """
    return haystack_with_starts(tok, kind, n_tokens, seed)[0]

"""Common and frequent words extraction, RULER's aggregation tasks (Hsieh et al., arXiv:2404.06654).

In both, the word list IS the haystack and fills the prompt, so `depth` is unused (only
range-checked) and so is `haystack` (only checked to be a known kind).

`cwe`, after NVIDIA/RULER `scripts/data/synthetic/common_words_extraction.py`: a numbered list
"1. word 2. word ..." in which NUM_COMMON words each appear `f` times and the other words fewer
times; the model must name the common ones. The words are the distinct lowercase words of the
prose haystack (~2,400 of them), shuffled by `random.Random(f"cwe-{seed}")`; a common word is
never a substring of another word in that pool. `f` is the largest value <= MAX_COMMON_FREQ
(RULER's freq_cw = 30) whose common items take at most half the list, so short prompts get fewer
repetitions (f = 2 at ~300 tokens); every other word appears once, or cycles through the pool when
the list is longer than it, and a length whose list would repeat them `f` times is rejected.

`fwe`, after RULER `scripts/data/synthetic/freq_words_extraction.py`: "coded words" (random
lowercase strings) are repeated with Zipf counts, the k-th word int(N * k^-ALPHA / zeta(ALPHA))
times for the largest N that fits, and shuffled; the most frequent is the noise word "...." that
the question says to ignore, and the answers are the next NUM_ANSWERS. Leftover tokens are more
noise at the end. A length too short for MIN_WORDS words, below which the answers could tie with
the next word, is rejected. RULER's defaults: ALPHA = 2.0, VOCAB_SIZE = 2000 coded words of
WORD_LEN = 6 letters, drawn from `random.Random(f"fwe-{seed}")`.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import string
from functools import lru_cache

import torch

from attnsieve.eval.tasks.base import Sample, answer_budget, bos_ids, check_depth, encode, too_short
from attnsieve.eval.tasks.haystack import check_haystack, source_text

NUM_COMMON = 10  # words that repeat: the answers
MAX_COMMON_FREQ = 30  # most times each common word appears
CWE_HEAD = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = (
    f"\nQuestion: What are the {NUM_COMMON} most common words in the above list?"
    f" Answer: The top {NUM_COMMON} words that appear most often in the list are:"
)


@lru_cache(maxsize=1)
def word_pool() -> tuple[str, ...]:
    """Distinct lowercase words of 4-12 letters in the prose haystack (not parts of identifiers), sorted."""
    return tuple(sorted(set(re.findall(r"(?<![\w.])[a-z]{4,12}(?![\w(])", source_text("prose")))))


@lru_cache(maxsize=8)
def _word_ids(tok) -> dict[str, list[int]]:
    pool = word_pool()
    return dict(zip(pool, tok([" " + w for w in pool], add_special_tokens=False)["input_ids"], strict=True))


def _pick_common(pool: list[str]) -> list[str]:
    """The first NUM_COMMON words of `pool` that no other word in it contains, so none gets credit by substring."""
    joined = "\n".join(pool)
    ok = (w for w in pool if joined.count(w) == 1 and w not in CWE_HEAD + CWE_QUESTION)
    return list(itertools.islice(ok, NUM_COMMON))


def make_cwe(tok, length: int, depth: float, seed: int, haystack: str = "repeat") -> Sample:
    check_depth(depth)
    check_haystack(haystack)
    rng = random.Random(f"cwe-{seed}")
    pool = list(word_pool())
    rng.shuffle(pool)
    common = _pick_common(pool)
    uncommon = [w for w in pool if w not in common]
    word_ids = _word_ids(tok)
    head_ids, q_ids = bos_ids(tok) + encode(tok, CWE_HEAD), encode(tok, CWE_QUESTION)
    room = length - len(head_ids) - len(q_ids)
    # Every item " {i}. {word}" has >= 2 tokens, so at most room // 2 + 1 numbers are ever needed.
    n_nums = max(room // 2 + 1, 2 * NUM_COMMON + 1)
    num_ids = tok([f" {i}." for i in range(1, n_nums + 1)], add_special_tokens=False)["input_ids"]

    def cost(words: list[str]) -> int:  # tokens of a list of items, whatever their order
        return sum(len(num_ids[i]) for i in range(len(words))) + sum(len(word_ids[w]) for w in words)

    fits = (f for f in range(MAX_COMMON_FREQ, 1, -1) if NUM_COMMON * f < n_nums and 2 * cost(common * f) <= room)
    freq = next(fits, None)
    if freq is None:
        raise too_short(length, length - room + 2 * cost(common * 2))
    items, total, j = common * freq, cost(common * freq), 0
    while total + len(num_ids[len(items)]) + len(word_ids[uncommon[j % len(uncommon)]]) <= room:
        items.append(uncommon[j % len(uncommon)])
        total += len(num_ids[len(items) - 1]) + len(word_ids[items[-1]])
        j += 1
    # The last few tokens: one more item of exactly their size if a word allows, else a cut-off item.
    num, rem = num_ids[len(items)], room - total
    nexts = (uncommon[(j + i) % len(uncommon)] for i in range(len(uncommon)))
    last = next((w for w in nexts if len(num) + len(word_ids[w]) == rem), None)
    if last is not None:
        items.append(last)
    tail = [] if last is not None else (num + word_ids[uncommon[j % len(uncommon)]])[:rem]
    repeats = -(-(len(items) - len(common) * freq) // len(uncommon))
    if repeats >= freq:
        raise ValueError(f"length {length} is too long for cwe: its {len(uncommon)}-word pool would repeat "
                         f"uncommon words {repeats} times, as often as the common ones ({freq})")
    rng.shuffle(items)
    body = [t for i, w in enumerate(items) for t in num_ids[i] + word_ids[w]]
    ids = head_ids + body + tail + q_ids
    if len(ids) != length:  # internal invariant of the construction above
        raise RuntimeError(f"built {len(ids)} tokens, expected {length}")
    return Sample("cwe", length, depth, seed, torch.tensor([ids]), common, max_new_tokens=answer_budget(tok, common),
                  meta={"head": CWE_HEAD, "question": CWE_QUESTION, "common_freq": freq})


ALPHA = 2.0  # Zipf exponent
ZETA = math.pi**2 / 6  # zeta(ALPHA) for ALPHA = 2, the Zipf normaliser
VOCAB_SIZE = 2000  # coded words, the first of them replaced by the noise word
WORD_LEN = 6  # letters per coded word
NUM_ANSWERS = 3  # most frequent coded words asked for
NOISE = "...."
# From this many words on, the last answer always outnumbers the next word: N (4^-a - 5^-a) / zeta >= 1.
MIN_WORDS = math.ceil(ZETA / ((NUM_ANSWERS + 1) ** -ALPHA - (NUM_ANSWERS + 2) ** -ALPHA))
FWE_HEAD = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
FWE_QUESTION = (
    f"\nQuestion: Do not provide any explanation. Please ignore the dots '{NOISE}'. What are the three most"
    " frequently appeared words in the above coded text? Answer: According to the coded text above, the three"
    " most frequently appeared words are:"
)


def zipf_counts(n_words: int) -> list[int]:
    """How often each vocabulary rank appears in a text of about `n_words` words."""
    return [int(n_words * k**-ALPHA / ZETA) for k in range(1, VOCAB_SIZE + 1)]


def make_fwe(tok, length: int, depth: float, seed: int, haystack: str = "repeat") -> Sample:
    check_depth(depth)
    check_haystack(haystack)
    rng = random.Random(f"fwe-{seed}")
    vocab = [NOISE]
    while len(vocab) < VOCAB_SIZE:
        w = "".join(rng.choices(string.ascii_lowercase, k=WORD_LEN))
        if w not in vocab and w not in FWE_HEAD + FWE_QUESTION:
            vocab.append(w)
    vocab_ids = tok([" " + w for w in vocab], add_special_tokens=False)["input_ids"]
    head_ids, q_ids = bos_ids(tok) + encode(tok, FWE_HEAD), encode(tok, FWE_QUESTION)
    room = length - len(head_ids) - len(q_ids)

    def cost(n_words: int) -> int:
        return sum(c * len(ids) for c, ids in zip(zipf_counts(n_words), vocab_ids, strict=True))

    lo, hi = 0, 2 * max(room, 0) + 10  # cost(hi) >= hi / ZETA > room: the noise word alone overflows
    while lo < hi:  # largest n_words whose text fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= room else (lo, mid - 1)
    if lo < MIN_WORDS:
        raise too_short(length, length - room + cost(MIN_WORDS))
    counts = zipf_counts(lo)
    words = [k for k, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(words)
    body = [t for k in words for t in vocab_ids[k]]
    body += (vocab_ids[0] * (room - len(body)))[: room - len(body)]
    ids = head_ids + body + q_ids
    if len(ids) != length:  # internal invariant of the construction above
        raise RuntimeError(f"built {len(ids)} tokens, expected {length}")
    answers = vocab[1 : NUM_ANSWERS + 1]
    return Sample("fwe", length, depth, seed, torch.tensor([ids]), answers, max_new_tokens=answer_budget(tok, answers),
                  meta={"head": FWE_HEAD, "question": FWE_QUESTION, "counts": counts[: NUM_ANSWERS + 2]})

"""Re-ranking task: find, among N passages of CPython's documentation, the one a sentence was taken from.

Built offline from `pydoc_data.topics` (the stdlib's copy of the language reference that `help()`
shows): every topic is split into its sections (a heading underlined with `*`, `=`, `-`, ...);
sections repeated under several topics are kept once. A section is a candidate when its first
sentence has 6 to 45 words and the rest of it at least 60. A sample takes one candidate (chosen by
the seed): the query is its first sentence; its passage is the section without that sentence (and
without its heading), so the query never occurs verbatim in the passage. N - 1 distractors are other
candidates' passages, from other topics and other headings, prepared the same way. The relevant
passage sits at position round(depth * (N - 1)); passages are whitespace-collapsed and truncated
(token by token, longest first) so that the ICR prompt (`attnsieve.signals.rerank.icr_prompt`) fits
`length` tokens. The query shares words with its passage (the section's subject, usually), so the
task is partly lexical: the evaluation reports BM25 on the same passages beside ICR.
"""

from __future__ import annotations

import functools
import random
import re

import torch

from attnsieve.eval.tasks.base import Sample, encode

MIN_QUERY_WORDS, MAX_QUERY_WORDS, MIN_PASSAGE_WORDS = 6, 45, 60
DEFAULT_PASSAGES = 10
MIN_PASSAGE_TOKENS = 16  # a length too short to give each passage this many tokens is refused
_UNDERLINE = re.compile(r"^([*=\-~^])\1{2,}\s*$")
_SENTENCE = re.compile(r"(.+?[.:;])(?:\s|$)")


@functools.cache
def sections() -> tuple[tuple[str, str, str, str], ...]:
    """(topic, heading, first sentence, rest) of every candidate section, in topic order, headings unique."""
    from pydoc_data.topics import topics

    out, seen = [], set()
    for topic in sorted(topics):
        lines = topics[topic].split("\n")
        starts = [i for i in range(len(lines) - 1) if lines[i].strip() and _UNDERLINE.match(lines[i + 1])]
        for j, s in enumerate(starts):
            heading = lines[s].strip()
            body = " ".join("\n".join(lines[s + 2 : starts[j + 1] if j + 1 < len(starts) else len(lines)]).split())
            m = _SENTENCE.match(body)
            if heading in seen or m is None:
                continue
            seen.add(heading)
            first, rest = m.group(1), body[m.end() :].strip()
            if MIN_QUERY_WORDS <= len(first.split()) <= MAX_QUERY_WORDS and len(rest.split()) >= MIN_PASSAGE_WORDS:
                out.append((topic, heading, first, rest))
    return tuple(out)


def _fit(tok, query: str, passages: list[str], length: int) -> list[str]:
    """Passages truncated (longest first, at token granularity) so that the ICR prompt fits `length` tokens."""
    from attnsieve.signals.rerank import icr_prompt

    ids = [encode(tok, p) for p in passages]
    overhead = icr_prompt(tok, query, ["" for _ in passages]).length
    budget = length - overhead - 2 * len(passages)  # room for tokens merging differently at the cut
    if budget < MIN_PASSAGE_TOKENS * len(passages):
        raise ValueError(f"length {length} is too short for {len(passages)} passages (needs at least "
                         f"{overhead + (MIN_PASSAGE_TOKENS + 2) * len(passages)} tokens)")
    for _ in range(8):
        # water-filling: the largest cap c with sum(min(len, c)) <= budget
        lens = sorted(len(x) for x in ids)
        cap, left = lens[-1], budget
        for i, n in enumerate(lens):
            share = left // (len(lens) - i)
            if n > share:
                cap = share
                break
            left -= n
        texts = [tok.decode(x[:cap]).strip() if len(x) > cap else p for x, p in zip(ids, passages, strict=True)]
        over = icr_prompt(tok, query, texts).length - length
        if over <= 0:
            return texts
        budget -= over + len(passages)
    raise RuntimeError(f"could not fit {len(passages)} passages into {length} tokens")  # internal invariant


def make_rerank(tok, length: int, depth: float, seed: int, haystack: str = "repeat", n: int = DEFAULT_PASSAGES
                ) -> Sample:
    """One re-ranking sample: `meta` holds `query`, `passages` (N texts), `relevant` (its index) and `sources`
    ((topic, heading) of each passage); `input_ids` is the ICR prompt with the query, at most `length` tokens.
    `haystack` is accepted for the common task signature and unused."""
    from attnsieve.signals.rerank import icr_prompt

    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    pool = sections()
    if not 2 <= n <= len(pool):
        raise ValueError(f"the number of passages must be in [2, {len(pool)}], got {n}")
    rng = random.Random(f"rerank-{seed}")
    rel = rng.randrange(len(pool))
    topic, heading, query, rest = pool[rel]
    others = [i for i, s in enumerate(pool) if s[0] != topic and s[1] != heading and query not in s[3]]
    chosen = rng.sample(others, n - 1)
    where = round(depth * (n - 1))
    order = chosen[:where] + [rel] + chosen[where:]
    passages = _fit(tok, query, [pool[i][3] for i in order], length)
    prompt = icr_prompt(tok, query, passages)
    ids = prompt.prefix + prompt.tail
    return Sample("rerank", len(ids), depth, seed, torch.tensor([ids]), [str(where)], max_new_tokens=0,
                  meta={"query": query, "passages": passages, "relevant": where,
                        "sources": [list(pool[i][:2]) for i in order]})


def bm25_scores(query: str, passages: list[str]) -> list[float]:
    """BM25 (bm25s, Lucene variant, English stop words, no stemming) of each passage for the query."""
    try:
        import bm25s
    except ImportError as e:  # pragma: no cover - the rerank extra installs it
        raise ValueError("the BM25 baseline needs the bm25s package: pip install 'attnsieve[rerank]'") from e
    kw = dict(stopwords="en", return_ids=False, show_progress=False)
    index = bm25s.BM25()
    index.index(bm25s.tokenize(passages, **kw), show_progress=False)
    q = bm25s.tokenize([query], **kw)[0]
    return [float(s) for s in index.get_scores(q)] if q else [0.0] * len(passages)


def ranked(scores: list[float]) -> list[int]:
    """Indices by score, best first (ties: input order)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def random_order(n: int, seed: int) -> list[int]:
    """The random-order baseline: a permutation of range(n) fixed by the seed."""
    order = list(range(n))
    random.Random(f"rerank-random-{seed}").shuffle(order)
    return order

"""Needle-in-a-haystack retrieval, RULER's four NIAH variants (Hsieh et al., arXiv:2404.06654).

Needles read "One of the special magic numbers for {key} is: {value}." with adjective-noun keys
and 7-digit values, after NVIDIA/RULER `scripts/data/synthetic/niah.py`. Variants (RULER's
num_needle_k / num_needle_v / num_needle_q): single 1/1/1; multikey 4/1/1 (three distractor keys);
multivalue 1/4/1 (partial credit per value); multiquery 4/1/4 (all four keys asked at once);
multiturn 4/1/4 asked one after another on the same cache (the prompt asks the first key; each
later turn appends the next question after the previous answer, as a chat or a document asked
several questions does: the setting query-agnostic KV compression is for).
Needles go in key order, each key's values in order; the first sits at `depth` and the rest are
spread evenly after it (`spread_depths`), so for multikey `depth` is the depth of the real needle.
Keys and values are drawn from `random.Random(f"{task}-{seed}")`, the same for every length and
depth, and never occur in the haystack text.
"""

from __future__ import annotations

import random

import torch

from attnsieve.eval.tasks.base import Sample, answer_budget, build_prompt_multi, spread_depths
from attnsieve.eval.tasks.haystack import source_text

HEAD = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n"
)
NEEDLE = " One of the special magic numbers for {key} is: {value}."
QUESTION = (
    "\nWhat are all the special magic numbers for {query} mentioned in the provided text?"
    " The special magic numbers for {query} mentioned in the provided text are"
)
ADJECTIVES = (
    "amber", "brave", "calm", "damp", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lively",
    "mellow", "narrow", "odd", "proud", "quiet", "rapid", "silent", "tame", "upset", "vivid", "wary", "young",
    "zesty", "bitter", "crisp", "dusty", "fancy", "gloomy", "humble", "lucky", "misty", "noisy", "polite", "rustic",
)
NOUNS = (
    "anchor", "basket", "candle", "dolphin", "engine", "falcon", "garden", "harbor", "island", "jacket", "kettle",
    "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunic", "umbrella", "violin",
    "walnut", "yacht", "zebra", "bridge", "cactus", "desert", "feather", "glacier", "helmet", "ladder", "marble",
    "pebble", "rocket", "spruce",
)


def _distinct(rng: random.Random, n: int, draw, avoid: str) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = draw(rng)
        if x not in out and x not in avoid:
            out.append(x)
    return out


def _niah(task: str, tok, length: int, depth: float, seed: int, haystack: str,
          n_keys: int, n_values: int, n_queries: int) -> Sample:
    rng = random.Random(f"{task}-{seed}")
    avoid = source_text(haystack) + HEAD + QUESTION
    keys = _distinct(rng, n_keys, lambda r: f"{r.choice(ADJECTIVES)}-{r.choice(NOUNS)}", avoid)
    values = _distinct(rng, n_keys * n_values, lambda r: str(r.randint(1_000_000, 9_999_999)), avoid)
    by_key = [values[i * n_values : (i + 1) * n_values] for i in range(n_keys)]
    needles = [NEEDLE.format(key=k, value=v) for k, vs in zip(keys, by_key, strict=True) for v in vs]
    queries = keys[:n_queries]
    query = queries[0] if n_queries == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    question = QUESTION.format(query=query)
    ids = build_prompt_multi(tok, head=HEAD, needles=needles, question=question,
                             haystack_kind=haystack, seed=seed, length=length,
                             depths=spread_depths(depth, len(needles)))
    answers = [v for vs in by_key[:n_queries] for v in vs]
    return Sample(task, length, depth, seed, torch.tensor([ids]), answers, max_new_tokens=answer_budget(tok, answers),
                  meta={"head": HEAD, "needles": needles, "question": question, "keys": keys})


def make_niah_single(tok, length: int, depth: float, seed: int, haystack: str = "repeat") -> Sample:
    """One key, one value, one query."""
    return _niah("niah_single", tok, length, depth, seed, haystack, n_keys=1, n_values=1, n_queries=1)


def make_niah_multikey(tok, length: int, depth: float, seed: int, haystack: str = "repeat") -> Sample:
    """The asked key's needle at `depth`, three distractor keys' needles after it."""
    return _niah("niah_multikey", tok, length, depth, seed, haystack, n_keys=4, n_values=1, n_queries=1)


def make_niah_multivalue(tok, length: int, depth: float, seed: int, haystack: str = "repeat") -> Sample:
    """One key with four values; every value is an answer."""
    return _niah("niah_multivalue", tok, length, depth, seed, haystack, n_keys=1, n_values=4, n_queries=1)


def make_niah_multiquery(tok, length: int, depth: float, seed: int, haystack: str = "repeat") -> Sample:
    """Four keys, all asked at once; their four values are the answers."""
    return _niah("niah_multiquery", tok, length, depth, seed, haystack, n_keys=4, n_values=1, n_queries=4)


def make_niah_multiturn(tok, length: int, depth: float, seed: int, haystack: str = "repeat") -> Sample:
    """Four keys asked one per turn on the same cache: the prompt asks the first, `meta["turns"]` holds
    the three follow-up questions and their answers (the score is the fraction of turns answered)."""
    s = _niah("niah_multiturn", tok, length, depth, seed, haystack, n_keys=4, n_values=1, n_queries=1)
    keys, values = s.meta["keys"], [n.rsplit(" ", 1)[-1].rstrip(".") for n in s.meta["needles"]]
    s.meta["turns"] = [{"question": QUESTION.format(query=k), "answers": [v]} for k, v in zip(keys[1:], values[1:],
                                                                                         strict=True)]
    return s

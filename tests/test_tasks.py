"""Synthetic tasks: exact lengths, determinism, needles present once and at their depth, scoring."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from attnsieve.eval.tasks import (
    HAYSTACKS,
    TASKS,
    build_prompt,
    build_prompt_multi,
    haystack_ids,
    passkey,
    score_contains,
)
from attnsieve.eval.tasks.base import SNAP, encode
from attnsieve.eval.tasks.cwe import NOISE
from attnsieve.eval.tasks.haystack import FILLER, source_text

LENGTHS = (300, 1000, 2049)
NEEDLE_TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "niah_multiturn", "vt")
WORD_TASKS = ("cwe", "fwe")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from attnsieve.models import resolve

    return AutoTokenizer.from_pretrained(resolve("gemma3-270m"))


def find(ids: list[int], sub: list[int], start: int = 0) -> int:
    for i in range(start, len(ids) - len(sub) + 1):
        if ids[i : i + len(sub)] == sub:
            return i
    raise AssertionError(f"needle ids {sub} not in the prompt")


def split(tok, sample):
    """(ids, where the haystack starts, where the question starts), checking head and question are in place."""
    ids = sample.input_ids[0].tolist()
    head, question = encode(tok, sample.meta["head"]), encode(tok, sample.meta["question"])
    assert ids[0] == tok.bos_token_id and ids[1 : 1 + len(head)] == head
    assert ids[len(ids) - len(question) :] == question
    return ids, 1 + len(head), len(ids) - len(question)


def test_registry_names():
    assert list(TASKS) == ["passkey", *NEEDLE_TASKS[1:], *WORD_TASKS]
    assert HAYSTACKS == ("repeat", "prose")


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("name", TASKS)
def test_exact_length_deterministic_and_answers_in_prompt(tok, name, haystack, length):
    make = TASKS[name]
    a, b = make(tok, length, 0.4, 0, haystack), make(tok, length, 0.4, 0, haystack)
    c = make(tok, length, 0.4, 1, haystack)
    assert a.input_ids.shape == (1, length) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids) and a.answers == b.answers
    assert not torch.equal(a.input_ids, c.input_ids)
    assert (a.task, a.length, a.depth, a.seed) == (name, length, 0.4, 0)
    text = tok.decode(a.input_ids[0])
    assert a.answers and all(ans in text for ans in a.answers)
    assert a.max_new_tokens >= len(encode(tok, ", ".join(a.answers)))


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("name", NEEDLE_TASKS)
def test_needles_in_order_at_depth_and_answers_only_in_needles(tok, name, haystack, length):
    for depth in (0.0, 0.3, 0.8, 1.0):
        s = TASKS[name](tok, length, depth, 3, haystack)
        ids, hay_start, hay_end = split(tok, s)
        needles = [encode(tok, n) for n in s.meta["needles"]]
        at = []
        for n in needles:
            at.append(find(ids, n, at[-1] + 1 if at else 0))
        room = hay_end - hay_start - sum(map(len, needles))
        # Needle k's offset into the haystack (less the needles before it) as a fraction of the haystack:
        # the first at `depth`, the others evenly spaced after it.
        for k, pos in enumerate(at):
            offset = pos - hay_start - sum(map(len, needles[:k]))
            assert abs(offset / room - (depth + (1 - depth) * k / len(at))) <= SNAP + 1 / room
        if len(needles) == 1 and length >= 1000:
            assert abs(at[0] / length - depth) <= 0.1
        text, needle_text = tok.decode(ids), " ".join(s.meta["needles"])
        for ans in s.answers:
            assert text.count(ans) == needle_text.count(ans) + s.meta["question"].count(ans) >= 1


@pytest.mark.parametrize("length", LENGTHS)
def test_cwe_answers_are_exactly_the_common_words(tok, length):
    s = TASKS["cwe"](tok, length, 0.5, 2)
    ids, start, end = split(tok, s)
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", tok.decode(ids[start:end])))
    freq = s.meta["common_freq"]
    assert freq >= 2 and len(s.answers) == 10
    assert all(counts[a] == freq for a in s.answers)
    assert max(n for w, n in counts.items() if w not in s.answers) < freq


@pytest.mark.parametrize("length", LENGTHS)
def test_fwe_answers_are_the_three_most_frequent_coded_words(tok, length):
    s = TASKS["fwe"](tok, length, 0.5, 2)
    ids, start, end = split(tok, s)
    counts = Counter(w for w in tok.decode(ids[start:end]).split() if not w.startswith("."))
    ranked = counts.most_common()
    assert {w for w, _ in ranked[:3]} == set(s.answers)
    assert ranked[2][1] > ranked[3][1]
    assert NOISE not in s.answers


@pytest.mark.parametrize("name", TASKS)
def test_scoring_full_partial_and_empty(tok, name):
    answers = TASKS[name](tok, 1000, 0.5, 0).answers
    assert score_contains(" " + ", ".join(answers) + ".", answers) == 1.0
    half = len(answers) // 2
    assert score_contains(", ".join(answers[:half]), answers) == half / len(answers)
    assert score_contains("", answers) == 0.0


def test_score_contains_reference():
    assert score_contains("the numbers are 123 and 456", ["123", "456", "789", "000"]) == 0.5
    assert score_contains("anything", []) == 0.0


@pytest.mark.parametrize("name", TASKS)
def test_too_short_raises_and_the_stated_minimum_works(tok, name):
    make = TASKS[name]
    with pytest.raises(ValueError, match="length 10 is too short") as err:
        make(tok, 10, 0.5, 0)
    need = int(re.search(r"needs at least (\d+) tokens", str(err.value)).group(1))
    assert make(tok, need, 0.5, 0).input_ids.shape == (1, need)
    with pytest.raises(ValueError, match="too short"):
        make(tok, need - 1, 0.5, 0)


@pytest.mark.parametrize("name", TASKS)
def test_bad_haystack_and_depth_raise(tok, name):
    with pytest.raises(ValueError, match="unknown haystack kind 'essay'; allowed: repeat, prose"):
        TASKS[name](tok, 1000, 0.5, 0, "essay")
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\], got 1.5"):
        TASKS[name](tok, 1000, 1.5, 0)


@pytest.mark.parametrize("n", [0, 1, 999, 150_000])
def test_haystack_lengths_and_text(tok, n):
    rep = haystack_ids(tok, "repeat", n, 0)
    assert len(rep) == n and rep == haystack_ids(tok, "repeat", n, 1)  # "repeat" ignores the seed
    prose = haystack_ids(tok, "prose", n, 0)
    assert len(prose) == n and prose == haystack_ids(tok, "prose", n, 0)
    if 0 < n < 100_000:  # shorter than the whole prose, so it cannot wrap around
        assert tok.decode(prose).strip() in source_text("prose")
        assert tok.decode(rep).strip() in FILLER * (n // 10 + 1)
    if n > 100:  # one token can coincide (many sentences start with " The"), a hundred cannot
        assert prose != haystack_ids(tok, "prose", n, 1)


def test_haystack_rejects_bad_arguments(tok):
    with pytest.raises(ValueError, match="unknown haystack kind 'noise'; allowed: repeat, prose"):
        haystack_ids(tok, "noise", 10, 0)
    with pytest.raises(ValueError, match="n_tokens must be >= 0, got -1"):
        haystack_ids(tok, "prose", -1, 0)


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_build_prompt_multi_places_each_needle_at_its_depth(tok, haystack):
    needles, depths = [" Alpha is 1.", " Beta is 2.", " Gamma is 3."], [0.15, 0.5, 0.85]
    ids = build_prompt_multi(tok, head="Head.", needles=needles, question=" Question?", haystack_kind=haystack,
                             seed=5, length=2049, depths=depths)
    assert len(ids) == 2049
    needle_ids = [encode(tok, n) for n in needles]
    start, room = 1 + len(encode(tok, "Head.")), 2049 - 1 - len(encode(tok, "Head.")) - len(encode(tok, " Question?"))
    room -= sum(map(len, needle_ids))
    before = 0
    for n, d in zip(needle_ids, depths, strict=True):
        at = find(ids, n)
        assert abs((at - start - before) / room - d) <= SNAP + 1 / room
        before += len(n)
    with pytest.raises(ValueError, match="got 3 needles but 2 depths"):
        build_prompt_multi(tok, head="H", needles=needles, question="Q", haystack_kind=haystack, seed=0,
                           length=2049, depths=[0.1, 0.2])


@pytest.mark.parametrize("length", LENGTHS)
def test_passkey_default_is_the_original_prompt(tok, length):
    """The default pass-key prompt is still literal filler + needle at the exact token, as before the haystacks."""
    for depth, seed in [(0.0, 0), (0.5, 1), (0.73, 2), (1.0, 3)]:
        s = TASKS["passkey"](tok, length, depth, seed)
        needle = f"The pass key is {s.answers[0]}. Remember it. {s.answers[0]} is the pass key. "
        ref = build_prompt(tok, head=passkey.HEAD, needle=needle, question=passkey.QUESTION, filler=FILLER,
                           length=length, depth=depth)
        assert s.input_ids[0].tolist() == ref


def test_build_prompt_with_a_literal_filler_is_exact(tok):
    ids = build_prompt(tok, head="Head.", needle=" KEY 777.", question=" Q?", filler=" la", length=500, depth=0.25)
    head, needle, question = encode(tok, "Head."), encode(tok, " KEY 777."), encode(tok, " Q?")
    room = 500 - 1 - len(head) - len(needle) - len(question)
    assert len(ids) == 500 and find(ids, needle) == 1 + len(head) + round(0.25 * room)

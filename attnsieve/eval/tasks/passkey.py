"""Pass-key retrieval (Mohtashami & Jaggi, arXiv:2305.16300): a 5-digit key hidden in filler."""

from __future__ import annotations

import random

import torch

from attnsieve.eval.tasks.base import Sample, build_prompt_multi
from attnsieve.eval.tasks.haystack import source_text

HEAD = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
QUESTION = "\nWhat is the pass key? The pass key is"


def make_passkey(tok, length: int, depth: float, seed: int, haystack: str = "repeat") -> Sample:
    rng = random.Random(f"passkey-{seed}-{length}-{depth}")
    key = str(rng.randint(10000, 99999))
    while key in source_text(haystack):  # the key must be findable only in the needle
        key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    ids = build_prompt_multi(tok, head=HEAD, needles=[needle], question=QUESTION, haystack_kind=haystack,
                             seed=seed, length=length, depths=[depth])
    return Sample("passkey", length, depth, seed, torch.tensor([ids]), [key], max_new_tokens=16,
                  meta={"head": HEAD, "needles": [needle], "question": QUESTION})

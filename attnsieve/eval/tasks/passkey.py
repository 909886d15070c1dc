"""Pass-key retrieval (Mohtashami & Jaggi, arXiv:2305.16300): a 5-digit key hidden in filler."""

from __future__ import annotations

import random

import torch

from attnsieve.eval.tasks.base import Sample, build_prompt

HEAD = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def make_passkey(tok, length: int, depth: float, seed: int) -> Sample:
    key = str(random.Random(f"passkey-{seed}-{length}-{depth}").randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    ids = build_prompt(tok, head=HEAD, needle=needle, question=QUESTION, filler=FILLER, length=length, depth=depth)
    return Sample("passkey", length, depth, seed, torch.tensor([ids]), [key], max_new_tokens=16)

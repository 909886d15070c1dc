"""Variable tracking, RULER's multi-hop tracing task (Hsieh et al., arXiv:2404.06654).

After NVIDIA/RULER `scripts/data/synthetic/variable_tracking.py`: the haystack hides a chain
"VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE", ... and the model must list every variable that ends
up holding 12345. Variable names are 5 random capital letters, the value has 5 digits, both drawn
from `random.Random(f"vt-{seed}")` and never occurring in the haystack text. The assignment sits
at `depth` and the hops follow it in order, spread evenly up to the end (`spread_depths`).

Hyperparameters (fixed, RULER's defaults): one chain (num_chains=1) of NUM_HOPS = 4 hops, so 5 variables.
"""

from __future__ import annotations

import itertools
import random
import string

import torch

from attnsieve.eval.tasks.base import Sample, answer_budget, build_prompt_multi, spread_depths
from attnsieve.eval.tasks.haystack import source_text

NUM_HOPS = 4  # "VAR B = VAR A" statements after the first assignment
HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
QUESTION = (
    "\nQuestion: Find all variables that are assigned the value {value} in the text above."
    " Answer: According to the chain(s) of variable assignment in the text above,"
    " {n} variables are assigned the value {value}, they are:"
)


def make_vt(tok, length: int, depth: float, seed: int, haystack: str = "repeat") -> Sample:
    rng = random.Random(f"vt-{seed}")
    avoid = source_text(haystack) + HEAD + QUESTION
    value = str(rng.randint(10000, 99999))
    while value in avoid:
        value = str(rng.randint(10000, 99999))
    names: list[str] = []
    while len(names) < NUM_HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names and name not in avoid:
            names.append(name)
    needles = [f" VAR {names[0]} = {value}."] + [f" VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
    question = QUESTION.format(value=value, n=len(names))
    ids = build_prompt_multi(tok, head=HEAD, needles=needles, question=question,
                             haystack_kind=haystack, seed=seed, length=length,
                             depths=spread_depths(depth, len(needles)))
    return Sample("vt", length, depth, seed, torch.tensor([ids]), names, max_new_tokens=answer_budget(tok, names),
                  meta={"head": HEAD, "needles": needles, "question": question, "value": value})

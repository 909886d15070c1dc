"""Synthetic long-context tasks, generated offline, deterministic for a seed, exact in token length.

Every generator is `make(tok, length, depth, seed, haystack="repeat") -> Sample`; RULER's
retrieval, multi-hop and aggregation tasks (Hsieh et al., arXiv:2404.06654) plus pass-key.
"""

from attnsieve.eval.tasks.base import Sample, build_prompt, build_prompt_multi, score_contains
from attnsieve.eval.tasks.cwe import make_cwe, make_fwe
from attnsieve.eval.tasks.haystack import HAYSTACKS, haystack_ids
from attnsieve.eval.tasks.niah import (
    make_niah_multikey,
    make_niah_multiquery,
    make_niah_multiturn,
    make_niah_multivalue,
    make_niah_single,
)
from attnsieve.eval.tasks.passkey import make_passkey
from attnsieve.eval.tasks.vt import make_vt

TASKS = {
    "passkey": make_passkey,
    "niah_single": make_niah_single,
    "niah_multikey": make_niah_multikey,
    "niah_multivalue": make_niah_multivalue,
    "niah_multiquery": make_niah_multiquery,
    "niah_multiturn": make_niah_multiturn,
    "vt": make_vt,
    "cwe": make_cwe,
    "fwe": make_fwe,
}

__all__ = [
    "HAYSTACKS",
    "TASKS",
    "Sample",
    "build_prompt",
    "build_prompt_multi",
    "haystack_ids",
    "make_passkey",
    "score_contains",
]

"""KeyDiff: keep the prompt tokens whose keys differ most from the other keys of their head.

After prefill, each KV head's anchor is the mean of its stored keys normalised to unit length, and
every stored token is scored by its negative cosine similarity to that anchor: keys pointing away
from the head's common direction are kept, keys like the average are evicted. No attention score
is read, so the policy works unchanged with any prefill method. The prompt is compressed once
(and once per prefill chunk); decoded tokens are appended. Park et al., "KeyDiff: Key
Similarity-Based KV Cache Eviction for Long-Context LLM Inference in Resource-Constrained
Environments", arXiv:2504.15364 (2025).

Reference followed: NVIDIA kvpress, `kvpress/presses/keydiff_press.py`, `KeyDiffPress.score`
(the anchor, the score and the per-head selection); it has no parameter besides the ratio, so
neither has this policy beyond the shared `kv_sink` (first tokens always kept, 4: Gemma-3 needs its
first key; KeyDiff itself forces none) and `kv_recent` (0). `kv_budget` is the fraction of each
row's real prompt tokens kept. Deviations: the paper compresses block by block while reading the
prompt (kvpress's `BlockPress(KeyDiffPress(), block_size=128)` simulates it); here the whole prompt
is scored at once as `KeyDiffPress` alone does, and prefilling in chunks (`p.new_cache()`) gives the
block-wise form, each chunk re-scoring the kept tokens with the new ones against a fresh anchor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnsieve.cache.base import EvictingKV, KVPolicy, KVPolicyParams, register_policy


@dataclass
class KeyDiffParams(KVPolicyParams):
    """KeyDiff has no parameter of its own: only the shared kv_sink and kv_recent."""


def keydiff_scores(layer: EvictingKV) -> list[torch.Tensor]:
    """[L] per row: minus the cosine similarity of each stored key to the row's mean unit key."""
    k, _, _, valid = layer.row_tensors()  # [N, L, D], padding rows zero
    k = k.float()
    unit = F.normalize(k, dim=-1) * valid[..., None]
    anchor = unit.sum(1, keepdim=True) / valid.sum(1).clamp(min=1)[:, None, None]  # [N, 1, D]
    s = -F.cosine_similarity(k, anchor, dim=-1)  # [N, L]
    return [s[r, : p.numel()] for r, p in enumerate(layer.pos)]


class KeyDiffLayer(EvictingKV):
    def should_compress(self, Tq):
        return Tq > 1  # compress the prompt once (and each prefill chunk); decoded tokens are kept

    def token_scores(self, q, k_new, new_valid, scale):
        return keydiff_scores(self)


@register_policy(
    "keydiff",
    kind="eviction",
    params=KeyDiffParams,
    summary="KeyDiff: prompt tokens whose keys are least similar to their head's mean key; no attention needed.",
)
class KeyDiff(KVPolicy):
    def layer(self, layer_idx, rank=0):
        return KeyDiffLayer(layer_idx, self)

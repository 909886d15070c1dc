"""SnapKV: keep the prompt tokens that the last queries of the prompt attend to most.

After prefill, the attention of the last `kv_window` prompt queries (the observation window) over
the prompt is summed over those queries and the KV group's heads, smoothed by 1-D pooling over
positions, and each KV head keeps its top tokens plus the window itself; decoded tokens are
appended. Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
(arXiv:2404.14469).

Parameters: `kv_window` (observation window, 32 in the paper's experiments), `kv_kernel`
(pooling kernel, 7), `kv_pooling` ("max" or "avg"), `kv_sink` (first tokens always kept: Gemma-3's
first key must stay). `kv_budget` is the fraction of each row's prompt tokens kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.cache.base import EvictingKV, KVPolicy, KVPolicyParams, register_policy


@dataclass
class SnapKVParams(KVPolicyParams):
    kv_window: int = field(default=32, metadata={"help": "observation window: last prompt queries scored (>= 1)"})
    kv_kernel: int = field(default=7, metadata={"help": "pooling kernel over positions (odd, >= 1)"})
    kv_pooling: str = field(default="max", metadata={"help": "pooling: max or avg"})

    def __post_init__(self):
        super().__post_init__()
        if self.kv_window < 1:
            raise ValueError(f"kv_window must be >= 1, got {self.kv_window}")
        if self.kv_kernel < 1 or self.kv_kernel % 2 == 0:
            raise ValueError(f"kv_kernel must be an odd number >= 1, got {self.kv_kernel}")
        if self.kv_pooling not in ("max", "avg"):
            raise ValueError(f"kv_pooling must be 'max' or 'avg', got {self.kv_pooling!r}")


def pooled_window_scores(layer: EvictingKV, q, new_valid, scale, window, kernel, pooling) -> list[torch.Tensor]:
    """SnapKV's per-row token scores: observation-window attention summed, then pooled over positions."""
    probs = layer.observation_probs(q, new_valid, scale, window)  # [N, G, w, L]
    s = probs.sum(dim=(1, 2))  # [N, L]
    if kernel > 1:
        pool = torch.nn.functional.max_pool1d if pooling == "max" else torch.nn.functional.avg_pool1d
        s = pool(s[:, None], kernel_size=kernel, stride=1, padding=kernel // 2)[:, 0]
    return [s[r, : p.numel()] for r, p in enumerate(layer.pos)]


class SnapKVLayer(EvictingKV):
    def should_compress(self, Tq):
        return Tq > 1  # compress the prompt once (and each prefill chunk); decoded tokens are kept

    def token_scores(self, q, k_new, new_valid, scale):
        p = self.p
        scores = pooled_window_scores(self, q, new_valid, scale, p.kv_window, p.kv_kernel, p.kv_pooling)
        # the observation window itself is always kept
        window = [pos.long() >= self.seen - p.kv_window for pos in self.pos]
        return [torch.where(w, torch.inf, s) for s, w in zip(scores, window, strict=True)]


@register_policy(
    "snapkv",
    kind="eviction",
    params=SnapKVParams,
    summary="SnapKV: prompt tokens most attended by the last prompt queries (pooled), per KV head.",
)
class SnapKV(KVPolicy):
    def layer(self, layer_idx, rank=0):
        return SnapKVLayer(layer_idx, self)

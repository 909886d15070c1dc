"""StreamingLLM's cache: the first few tokens (attention sinks) and the most recent ones.

Every global layer keeps, per row, its first `kv_sink` real tokens and the latest tokens up to the
budget; everything in between is evicted (and freed). Xiao et al., "Efficient Streaming Language
Models with Attention Sinks", ICLR 2024 (arXiv:2309.17453).

Parameters: `kv_sink` (sink tokens, paper default 4). The budget (`kv_budget`) is the fraction
of each row's real tokens kept; `kv_recent` is not used (the recent part fills the budget).
"""

from __future__ import annotations

from dataclasses import dataclass

from attnsieve.cache.base import EvictingKV, KVPolicy, KVPolicyParams, register_policy


@dataclass
class StreamingParams(KVPolicyParams):
    pass


class StreamingKV(EvictingKV):
    def token_scores(self, q, k_new, new_valid, scale):
        return [p.float() for p in self.pos]  # later = more important; sinks are forced


@register_policy(
    "streaming", kind="eviction", params=StreamingParams, summary="StreamingLLM: sink tokens + recent window."
)
class Streaming(KVPolicy):
    def layer(self, layer_idx, rank=0):
        return StreamingKV(layer_idx, self)

"""TOVA (Token Omission Via Attention): evict the token the current query attends least.

At every step past the budget, each row drops the stored tokens with the lowest attention from
the newest query, averaged over the layer's query heads (TOVA scores with the mean over heads and
evicts per layer); at prefill the last prompt query does the scoring. Oren et al., "Transformers
are Multi-State RNNs", EMNLP 2024 (arXiv:2401.06104).

Parameters: `kv_sink` (first tokens always kept: Gemma-3 collapses without its first key; TOVA
itself forces none), `kv_recent` (latest tokens always kept, default 1: the newest token).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attnsieve.cache.base import EvictingKV, KVPolicy, KVPolicyParams, register_policy


@dataclass
class TOVAParams(KVPolicyParams):
    kv_recent: int = field(default=1, metadata={"help": "most recent tokens always kept (>= 0)"})


class TOVALayer(EvictingKV):
    def token_scores(self, q, k_new, new_valid, scale):
        probs = self.observation_probs(q, new_valid, scale, 1)  # [N, G, 1, L]: the newest query
        s = probs.mean(dim=(1, 2)).view(self.B, self.Hkv, -1).mean(1, keepdim=True)  # over all heads
        s = s.expand(-1, self.Hkv, -1).reshape(self.B * self.Hkv, -1)
        return [s[r, : p.numel()] for r, p in enumerate(self.pos)]


@register_policy(
    "tova", kind="eviction", params=TOVAParams, summary="TOVA: evict the tokens the newest query attends least."
)
class TOVA(KVPolicy):
    def layer(self, layer_idx, rank=0):
        return TOVALayer(layer_idx, self)

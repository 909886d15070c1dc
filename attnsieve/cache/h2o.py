"""H2O (Heavy-Hitter Oracle): keep the tokens with the largest accumulated attention, plus recent ones.

Every stored token carries the attention it has received, summed over all queries so far (the
prompt's queries at prefill, then each decoding step's query) and over the KV group's heads. The
budget is split between heavy hitters and the most recent tokens, and the cache evicts at every
step to stay within it. Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference
of Large Language Models", NeurIPS 2023 (arXiv:2306.14048).

Parameters: `kv_heavy_ratio` (share of the budget for heavy hitters, paper 0.5; the rest is
recent tokens), `kv_sink`. Cost: H2O's prompt scores need every prompt query's attention row,
i.e. one extra pass of (chunked, never T x T) dense attention scores over the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.cache.base import EvictingKV, KVPolicy, KVPolicyParams, forced_mask, register_policy

PROMPT_CHUNK = 256  # prompt queries scored per step (bounds the [rows, chunk, L] buffer)


@dataclass
class H2OParams(KVPolicyParams):
    kv_heavy_ratio: float = field(default=0.5, metadata={"help": "share of the budget for heavy hitters, in [0, 1]"})

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.kv_heavy_ratio <= 1:
            raise ValueError(f"kv_heavy_ratio must be in [0, 1], got {self.kv_heavy_ratio}")


class H2OLayer(EvictingKV):
    def __init__(self, layer_idx, policy, window=None):
        super().__init__(layer_idx, policy, window)
        self.acc: list[torch.Tensor] = []  # accumulated attention per stored token, per row

    def compress(self, q, k_new, new_valid, scale):
        # Extend the scores to the new tokens, then add this call's queries' attention over every
        # stored token (at a decoding step: one query; at prefill: every prompt query, chunked).
        self.acc = [
            torch.cat([a, torch.zeros(p.numel() - a.numel(), device=p.device)])
            for a, p in zip(self.acc or [torch.zeros(0, device=p.device) for p in self.pos], self.pos, strict=True)
        ]
        Tq = k_new.shape[2]
        total = None
        for s in range(0, Tq, PROMPT_CHUNK):
            e = min(s + PROMPT_CHUNK, Tq)
            probs = self.call_probs(q, new_valid, scale, s, e)  # [N, G, e - s, L]
            part = probs.sum(dim=(1, 2))
            total = part if total is None else total + part
        self.acc = [a + total[r, : a.numel()] for r, a in enumerate(self.acc)]
        super().compress(q, k_new, new_valid, scale)

    def token_scores(self, q, k_new, new_valid, scale):
        budgets = self.row_budgets()
        out = []
        for r, (a, p) in enumerate(zip(self.acc, self.pos, strict=True)):
            recent = budgets[r] - int(round(self.p.kv_heavy_ratio * budgets[r]))
            is_recent = forced_mask(p, self.seen, 0, recent)
            out.append(torch.where(is_recent, torch.finfo(a.dtype).max / 2, a))
        return out

    def after_keep(self, keep):
        self.acc = [a.index_select(0, idx.sort().values) for a, idx in zip(self.acc, keep, strict=True)]

    def _held(self):
        return [*super()._held(), *self.acc]


@register_policy(
    "h2o",
    kind="eviction",
    params=H2OParams,
    summary="H2O: heavy hitters by accumulated attention + recent tokens, evicting at every step.",
)
class H2O(KVPolicy):
    def layer(self, layer_idx, rank=0):
        return H2OLayer(layer_idx, self)

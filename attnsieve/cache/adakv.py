"""Ada-KV: one budget per layer, shared out among its KV heads by their attention concentration.

SnapKV's scores are computed per KV head; instead of the same number of tokens per head, the
layer keeps its top `budget * heads` scores across all heads together, so heads whose attention
is concentrated keep few tokens and dispersed heads keep many; a floor (`kv_alpha` of the uniform
share) guards every head. Each head's tokens are stored as its own tensor of its own length (real
variable-length storage, no padding or masks in memory). Feng et al., "Ada-KV: Optimizing KV
Cache Eviction by Adaptive Budget Allocation for Efficient LLM Inference", arXiv:2407.11550.

Parameters: `kv_alpha` (floor as a fraction of the uniform per-head budget, paper 0.2) and
SnapKV's `kv_window`, `kv_kernel`, `kv_pooling`, `kv_sink`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.cache.base import KVPolicy, keep_count, register_policy
from attnsieve.cache.snapkv import SnapKVLayer, SnapKVParams


@dataclass
class AdaKVParams(SnapKVParams):
    kv_alpha: float = field(default=0.2, metadata={"help": "per-head floor, fraction of the uniform budget, [0, 1]"})

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.kv_alpha <= 1:
            raise ValueError(f"kv_alpha must be in [0, 1], got {self.kv_alpha}")


class AdaKVLayer(SnapKVLayer):
    def compress(self, q, k_new, new_valid, scale):
        if self.policy.budget >= 1.0 or not self.should_compress(k_new.shape[2]):
            return
        scores = self.token_scores(q, k_new, new_valid, scale)
        keep = []
        for b in range(self.B):
            rows = range(b * self.Hkv, (b + 1) * self.Hkv)
            uniform = keep_count(self.valid_host[b], self.policy.budget)
            floor = min(uniform, int(self.p.kv_alpha * uniform))
            total = uniform * self.Hkv
            forced = []
            for r in rows:
                s = scores[r].clone()
                rank = torch.arange(s.numel(), device=s.device)
                s[rank < self.p.kv_sink] = torch.inf
                # each head's floor: its best `floor` tokens are kept outright
                if floor > 0:
                    s[torch.topk(s, min(floor, s.numel())).indices] = torch.inf
                forced.append(s)
            flat = torch.cat(forced)
            owner = torch.cat([torch.full((s.numel(),), i, device=flat.device) for i, s in enumerate(forced)])
            chosen = torch.topk(flat, min(total, flat.numel())).indices
            starts = [0]
            for s in forced:
                starts.append(starts[-1] + s.numel())
            for i, _ in enumerate(rows):
                mine = chosen[owner[chosen] == i] - starts[i]
                keep.append(mine)
        self.keep_rows(keep)


@register_policy(
    "adakv",
    kind="eviction",
    params=AdaKVParams,
    summary="Ada-KV: SnapKV scores with the layer budget shared across KV heads; variable-length heads.",
)
class AdaKV(KVPolicy):
    def layer(self, layer_idx, rank=0):
        return AdaKVLayer(layer_idx, self)

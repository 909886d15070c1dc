"""PyramidKV: SnapKV's selection with layer budgets that shrink from the lower to the upper layers.

Lower layers spread their attention widely and upper layers concentrate it (pyramidal
information funnelling), so the compressed layers' budgets form an arithmetic sequence from
`2 * avg - avg / beta` at the first layer down to `avg / beta` at the last, averaging the
requested budget; within a layer, tokens are chosen as SnapKV does. Cai et al., "PyramidKV:
Dynamic KV Cache Compression based on Pyramidal Information Funneling", arXiv:2406.02069.

Parameters: `kv_beta` (ratio of the average to the top layer's budget, paper 20), and SnapKV's
`kv_window`, `kv_kernel`, `kv_pooling`, `kv_sink`.

Layer budgets follow the reference (kvpress's `PyramidKVPress.get_layer_budget`, after
KVCache-Factory's pyramidkv_utils.py): with L real prompt tokens and W = `kv_window`, the selected
(non-window) tokens average L * kv_budget and fall linearly from max_num = 2 L kv_budget - min_num
at the first compressed layer to min_num = L kv_budget / beta at the last, max_num capped at
L - W (min_num then rising to keep the average). The observation window and the `kv_sink` first
tokens are kept on top of a layer's selected tokens (outside its budget), as KVCache-Factory keeps
its window. When the pyramid is impossible (not L >= max_num >= min_num >= W: the smallest layer
would hold less than one window) every layer falls back to uniform SnapKV, keeping
ceil(kv_budget * L) tokens with the window and sinks inside, as kvpress does. So the first token
survives in every layer at any budget (the top layer of a short prompt no longer keeps only its
window).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attnsieve.cache.base import KVPolicy, keep_count, register_policy
from attnsieve.cache.snapkv import SnapKVLayer, SnapKVParams


@dataclass
class PyramidKVParams(SnapKVParams):
    kv_beta: float = field(default=20.0, metadata={"help": "average / top-layer budget ratio (> 1)"})

    def __post_init__(self):
        super().__post_init__()
        if self.kv_beta <= 1:
            raise ValueError(f"kv_beta must be > 1, got {self.kv_beta}")


def layer_budget(L: int, avg: float, window: int, beta: float, n_layers: int, rank: int) -> int | None:
    """Selected (non-window) tokens of compressed layer `rank` for L prompt tokens, None: fall back to SnapKV."""
    low = L * avg / beta
    high = 2 * L * avg - low
    if high >= L - window:
        high = L - window
        low = 2 * L * avg - high
    if not (L >= high >= low >= window):
        return None
    step = (high - low) / (n_layers - 1) if n_layers > 1 else 0.0
    return round(high - min(rank, n_layers - 1) * step)


class PyramidLayer(SnapKVLayer):
    def __init__(self, layer_idx, policy, rank):
        super().__init__(layer_idx, policy)
        self.rank = rank

    def row_budgets(self):
        p, out = self.p, []
        for r in range(len(self.pos)):
            L = self.valid_host[r // self.Hkv]
            n = layer_budget(L, self.policy.budget, p.kv_window, p.kv_beta, self.policy.n_layers, self.rank)
            # the window and sinks are forced (kept first), so they come on top of the selected tokens
            out.append(keep_count(L, self.policy.budget) if n is None else min(L, n + p.kv_window + p.kv_sink))
        return out


@register_policy(
    "pyramidkv",
    kind="eviction",
    params=PyramidKVParams,
    summary="PyramidKV: SnapKV selection with budgets shrinking linearly from lower to upper layers.",
)
class PyramidKV(KVPolicy):
    def layer(self, layer_idx, rank=0):
        return PyramidLayer(layer_idx, self, rank)

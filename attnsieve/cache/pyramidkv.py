"""PyramidKV: SnapKV's selection with layer budgets that shrink from the lower to the upper layers.

Lower layers spread their attention widely and upper layers concentrate it (pyramidal
information funnelling), so the compressed layers' budgets form an arithmetic sequence from
`2 * avg - avg / beta` at the first layer down to `avg / beta` at the last, averaging the
requested budget; within a layer, tokens are chosen as SnapKV does. Cai et al., "PyramidKV:
Dynamic KV Cache Compression based on Pyramidal Information Funneling", arXiv:2406.02069.

Parameters: `kv_beta` (ratio of the average to the top layer's budget, paper 20), and SnapKV's
`kv_window`, `kv_kernel`, `kv_pooling`, `kv_sink`. Layer budgets are capped at keeping everything;
the model-level fraction kept is then at most `kv_budget`.
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


def layer_fractions(avg: float, n_layers: int, beta: float) -> list[float]:
    """Arithmetic budgets from the first to the last compressed layer, averaging `avg`."""
    if n_layers == 1:
        return [avg]
    low = avg / beta
    high = 2 * avg - low
    return [high - (high - low) * i / (n_layers - 1) for i in range(n_layers)]


class PyramidLayer(SnapKVLayer):
    def __init__(self, layer_idx, policy, fraction):
        super().__init__(layer_idx, policy)
        self.fraction = min(1.0, fraction)

    def row_budgets(self):
        return [keep_count(int(self.valid_seen[r // self.Hkv]), self.fraction) for r in range(len(self.pos))]


@register_policy(
    "pyramidkv",
    kind="eviction",
    params=PyramidKVParams,
    summary="PyramidKV: SnapKV selection with budgets shrinking linearly from lower to upper layers.",
)
class PyramidKV(KVPolicy):
    def layer(self, layer_idx, rank=0):
        fractions = layer_fractions(self.budget, self.n_layers, self.params.kv_beta)
        return PyramidLayer(layer_idx, self, fractions[min(rank, self.n_layers - 1)])

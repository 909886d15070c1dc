"""ThinK: prune each KV head's key channels by how much the latest queries use them.

At every prefill call (prompt or prompt chunk) each KV head scores key channel c as
||Q_obs[:, c] K[:, c]^T||_F = ||Q_obs[:, c]|| ||K[:, c]||, with Q_obs the last `kv_window` queries of
the KV group's heads and K the keys being pruned, keeps its top channels and stores those keys with
only the kept channels plus their indices; attention scores them with the query restricted to the
same channels. Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning", ICLR 2025
(arXiv:2407.21018).

Parameters: `kv_budget` (fraction of key channels kept: round(kv_budget * D)); without it
`kv_prune` (the paper's pruning ratio lambda, 0.4: D - floor(0.4 D) channels kept); `kv_window`
(observation window: queries scored and most recent keys kept whole, 32 as the paper's code).
Only keys are pruned (the paper's method; values are stored whole), so the memory kept is
(r + Dv) / (D + Dv) of the dense cache for the pruned tokens. The most recent `kv_window` tokens
and the tokens decoded after the prompt stay whole until the next prefill call (the paper's code
prunes the prompt once; decoded keys are kept whole). Budget 1.0 keeps every channel and stores
nothing reduced: exactly the dense cache.
Deviations: with grouped-query attention a KV head's channels are scored with the queries of all
its group's heads (the paper's code prunes per query head on repeated keys, which stores the keys
once per query head); channels are scored on the keys being pruned rather than on all keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnsieve.cache._reduced import ReducedKeyKV
from attnsieve.cache.base import KVPolicy, register_policy


@dataclass
class ThinKParams:
    kv_prune: float = field(
        default=0.4, metadata={"help": "fraction of key channels pruned without kv_budget (paper 0.4), in [0, 1)"}
    )
    kv_window: int = field(
        default=32, metadata={"help": "observation window: last queries scored, latest keys kept whole (>= 1)"}
    )

    def __post_init__(self):
        if not 0 <= self.kv_prune < 1:
            raise ValueError(f"kv_prune must be in [0, 1), got {self.kv_prune}")
        if self.kv_window < 1:
            raise ValueError(f"kv_window must be >= 1, got {self.kv_window}")


def channel_scores(q_obs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """||Q_obs[:, c] K[:, c]^T||_F for every channel c: q_obs [m, D] (a KV group's queries), k [n, D] -> [D]."""
    return q_obs.float().norm(dim=0) * k.float().norm(dim=0)


class ThinKLayer(ReducedKeyKV):
    def __init__(self, layer_idx: int, budget: float | None, prune: float, window: int):
        super().__init__(layer_idx)
        self.budget, self.prune = budget, prune  # channels kept: budget * D if given, else D - floor(prune * D)
        self.obs = window

    def kept_channels(self, D: int) -> int:
        keep = D - math.floor(self.prune * D) if self.budget is None else round(self.budget * D)
        return min(D, max(1, keep))

    def compress(self, q, k_new, new_valid, scale):
        B, H, Tq, D = q.shape
        r_keep = self.kept_channels(D)
        if Tq == 1 or r_keep >= D:  # decoded tokens stay whole (as the paper); budget 1.0 stores keys whole
            return
        G = H // self.Hkv
        w = min(self.obs, Tq)
        q_obs = q[:, :, Tq - w :]  # [B, H, w, D]
        if new_valid is not None:  # padding queries carry no information
            q_obs = q_obs * new_valid[:, None, Tq - w :, None].to(q.dtype)
        for r in range(len(self.keys)):
            b, h = divmod(r, self.Hkv)
            n = self.keys[r].shape[0] - self.obs  # the latest kv_window keys stay whole
            if n <= 0:
                continue
            group = q_obs[b, h * G : (h + 1) * G].reshape(G * w, D)
            score = channel_scores(group, self.keys[r][:n])
            channels = torch.topk(score, r_keep).indices.sort().values
            self.reduce_tail(r, n, channels=channels)


@register_policy(
    "think",
    kind="channels",
    params=ThinKParams,
    summary="ThinK: per KV head, key channels pruned by query-driven importance; scores in the kept channels.",
)
class ThinK(KVPolicy):
    def layer(self, layer_idx, rank=0):
        p = self.params
        return ThinKLayer(layer_idx, self.budget if self.budget_given else None, p.kv_prune, p.kv_window)

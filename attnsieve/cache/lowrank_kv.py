"""lowrank-kv: keys stored as coordinates on their top principal directions, found on the prompt.

Keys of a head lie close to a low-dimensional subspace (Singhania et al., "Loki: Low-Rank Keys for
Efficient Sparse Attention", NeurIPS 2024, arXiv:2406.02542). At the first prefill call each layer
and KV head computes the PCA of its own prompt keys (mean mu, top-r directions P [D, r], r =
ceil(kv_budget * D)); from then on every key is stored as its r coordinates (k - mu) P, with P
and mu, and scored as (q P) . k_r + q . mu = q . (mu + P k_r), the exact score against the
key's projection. Storing the projected keys instead of using them only to select tokens follows
Eigen Attention (Saxena et al., "Eigen Attention: Attention in Low-Rank Space for KV Cache
Compression", EMNLP Findings 2024, arXiv:2408.05646).

Parameters: `kv_budget` (fraction of key channels kept as rank: r = ceil(kv_budget * D)); without
it `kv_rank` (0.5). Values are stored whole (only keys are projected), so the memory kept is
(r + Dv) / (D + Dv) of the dense cache plus P and mu (D * (r + 1) numbers per row).
Deviations: the projection is calibrated on the prompt itself at run time rather than offline on
a calibration set (both papers), so no data leaves the input; later prefill chunks and decoded
keys reuse the first prefill call's basis; keys are centred before projecting (the offset q . mu
keeps scores exact on the subspace). At r = D the keys are stored unprojected: exactly dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnsieve.cache._reduced import ReducedKeyKV
from attnsieve.cache.base import KVPolicy, register_policy


@dataclass
class LowRankKVParams:
    kv_rank: float = field(default=0.5, metadata={"help": "rank as a fraction of D without kv_budget, in (0, 1]"})

    def __post_init__(self):
        if not 0 < self.kv_rank <= 1:
            raise ValueError(f"kv_rank must be in (0, 1], got {self.kv_rank}")


def principal_basis(k: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of keys k [n, D]: their mean [D] and top-r principal directions [D, r] (orthonormal columns).

    With fewer than r keys the remaining columns complete an orthonormal basis arbitrarily.
    """
    kf = k.double()
    mu = kf.mean(0)
    c = kf - mu
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a D x D problem gains nothing from threads; threaded LAPACK stalls on busy CPUs
    try:
        _, vecs = torch.linalg.eigh(c.T @ c)  # [D, D] orthonormal, ascending variance, whatever n is
    finally:
        torch.set_num_threads(threads)
    return mu.to(k.dtype), vecs[:, -r:].flip(-1).contiguous().to(k.dtype)


class LowRankKVLayer(ReducedKeyKV):
    def __init__(self, layer_idx: int, fraction: float):
        super().__init__(layer_idx)
        self.fraction = fraction

    def rank(self, D: int) -> int:
        return min(D, max(1, math.ceil(self.fraction * D - 1e-9)))

    def compress(self, q, k_new, new_valid, scale):
        D = k_new.shape[-1]
        r_keep = self.rank(D)
        if r_keep >= D:  # full rank: the keys themselves
            return
        for r in range(len(self.keys)):
            n = self.keys[r].shape[0]
            if n == 0:
                continue
            if self.segments[r]:  # the basis exists: project the new tail onto it
                self.reduce_tail(r, n)
            elif k_new.shape[2] > 1:  # the first prefill call calibrates the row's basis on its own keys
                mu, basis = principal_basis(self.keys[r], r_keep)
                self.reduce_tail(r, n, basis=basis, offset=mu)


@register_policy(
    "lowrank-kv",
    kind="lowrank",
    params=LowRankKVParams,
    summary="Low-rank keys: per KV head, PCA of the prompt's keys; keys stored and scored on r directions.",
)
class LowRankKV(KVPolicy):
    def layer(self, layer_idx, rank=0):
        return LowRankKVLayer(layer_idx, self.budget if self.budget_given else self.params.kv_rank)

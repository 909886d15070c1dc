"""SMYRF: asymmetric LSH clustering of queries and keys, several hash rounds merged without double counting.

An asymmetric transform turns maximum inner product into nearest neighbour (XBOX+: keys and
queries are padded with one extra coordinate each so all lie on one sphere), an E2LSH random
projection sorts the keys into balanced clusters of `k_cluster_size`, and each query attends
exactly the cluster nearest its own hash; `n_hashes` independent rounds are merged through
their log-sum-exp. Daras, Kitaev, Odena, Dimakis, "SMYRF: Efficient Attention using Asymmetric
Clustering", NeurIPS 2020 (arXiv:2010.05315); reference giannisdaras/smyrf.

Hyperparameters: `n_hashes` (hash rounds, 8 as in the paper's LLM experiments),
`k_cluster_size` (keys per balanced cluster, 64), `q_cluster_size` (queries per cluster in the
paper, 64; here the number of query rows batched per key cluster, which only affects speed),
`min_seq_len` (exact below, as in HyperAttention's causal split; 1024 = 2 * n_hashes *
k_cluster_size, below which hashing saves little), `seed` (projections), `density` (when set,
overrides min_seq_len and, if even the smallest exact leaves overshoot, halves k_cluster_size
down to 16, then n_hashes, then k_cluster_size again, choosing from the shapes alone the setting
whose predicted density is nearest the target; measured density counts the distinct keys each
query attends, so keys repeated across rounds lower it below the prediction).

Deviations, and why:
- Causality. SMYRF is non-causal. We apply it to causal layers through HyperAttention's causal
  split (`_hashing`): diagonal leaves exact, SMYRF on the lower-left quadrants whose keys all
  precede their queries. The paper also pairs the i-th query cluster with the i-th key cluster
  of the sorted orders, which makes a query's keys depend on later queries' hashes (a leak);
  here each query attends the key cluster holding the key nearest its own hash
  (`searchsorted`), so query clusters are no longer balanced, key clusters still are.
- XBOX+ uses the largest query norm among the queries at the quadrant's key positions (its first
  half) rather than among its own queries, which include later tokens; a query whose norm
  exceeds it gets a zero extra coordinate (inner-product order is preserved for each query).
- Duplicates. The paper sums the rounds' softmaxes weighted by their normalisers, so a key
  found in r rounds counts r times. Here a key already in the query's cluster of an earlier
  round is excluded from later rounds (tags in the kernel), so the rounds cover disjoint key
  sets and their log-sum-exp merge is exact attention over the union.
- E2LSH's offset and bucket width do not change the sort order of a projection, so the
  projection itself is the hash. Padding keys sort last and are never attended; on a sliding
  layer keys beyond the window are masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.kernels import merge
from attnsieve.kernels.grouped import grouped_attention
from attnsieve.methods._hashing import (
    SplitGrid,
    causal_split,
    generator,
    leaf_attention,
    locate,
    min_seq_len_for_density,
)
from attnsieve.methods.base import AttnOutput, Method, estimate_clock
from attnsieve.methods.registry import register


@dataclass
class LSHParams:
    n_hashes: int = field(default=8, metadata={"help": "hash rounds merged per query (1..32)"})
    q_cluster_size: int = field(default=64, metadata={"help": "query rows batched per key cluster (>= 1)"})
    k_cluster_size: int = field(default=64, metadata={"help": "keys per balanced cluster (>= 1)"})
    min_seq_len: int = field(default=1024, metadata={"help": "exact attention at or below this length (>= 1)"})
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides min_seq_len (and sizes)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random projections (>= 0)"})

    def __post_init__(self):
        if not 1 <= self.n_hashes <= 32:
            raise ValueError(f"n_hashes must be in [1, 32], got {self.n_hashes}")
        if self.q_cluster_size < 1:
            raise ValueError(f"q_cluster_size must be >= 1, got {self.q_cluster_size}")
        if self.k_cluster_size < 1:
            raise ValueError(f"k_cluster_size must be >= 1, got {self.k_cluster_size}")
        if self.min_seq_len < 1:
            raise ValueError(f"min_seq_len must be >= 1, got {self.min_seq_len}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def budget(p: LSHParams, Tq: int, Tk: int) -> tuple[int, int, int]:
    """(min_seq_len, n_hashes, k_cluster_size) the call runs with.

    With `density`, the exact leaves shrink first; while even the smallest overshoot, the
    clusters halve down to 16 keys, then the rounds halve down to 1, then the clusters again
    (small clusters run far below the kernel's efficiency, so rounds go first).
    """
    if p.density is None:
        return p.min_seq_len, p.n_hashes, p.k_cluster_size
    n, kcs = p.n_hashes, p.k_cluster_size
    while True:
        cap = n * kcs
        m, pred = min_seq_len_for_density(p.density, Tq, Tk, lambda nk, cap=cap: min(nk, cap))
        if pred <= 1.2 * p.density or (n == 1 and kcs == 1):
            return m, n, kcs
        if kcs > 16:
            kcs //= 2
        elif n > 1:
            n //= 2
        else:
            kcs //= 2


@register(
    "lsh",
    family="hashing",
    phases=("prefill",),
    params=LSHParams,
    summary="SMYRF: asymmetric LSH clusters, n_hashes rounds deduplicated, causal by recursive split.",
)
class LSH(Method):
    exact_params = {"min_seq_len": 1 << 30}  # one exact leaf: equals dense attention

    def prefill(self, q, k, v, ctx):
        p = self.params
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        t0 = estimate_clock(q)
        min_seq_len, n_hashes, kcs = budget(p, Tq, Tk)
        split = causal_split(Tk, min_seq_len)
        estimate_s = estimate_clock(q) - t0
        leaf = leaf_attention(q, k, v, split, scale=ctx.scale, key_valid=ctx.key_valid, window=ctx.window)
        if split.levels == 0:
            return AttnOutput(leaf.out, leaf.cells, estimate_s, leaf.lse)

        grid = SplitGrid(q, k, v, split, ctx.key_valid)
        first = Tk - Tq
        out = q.new_zeros(B, H, split.padded, v.shape[-1])
        lse = q.new_full((B, H, split.padded), float("-inf"))
        out[:, :, first:Tk], lse[:, :, first:Tk] = leaf.out, leaf.lse.to(q.dtype)
        cells = leaf.cells
        proj = torch.randn(p.n_hashes, D + 2, generator=generator(p.seed, ctx.layer_idx))[:n_hashes].to(q.device)
        for level in range(split.levels):
            w = split.leaf << level
            quad = grid.quadrants(w)
            exact = w < min_seq_len
            o, l, c, est = self._quadrant(quad, ctx, proj, kcs, grid.first_half_query_norm2(w), exact)
            estimate_s += est
            grid.merge_quadrant(out, lse, quad, o, l)
            cells += c
        return AttnOutput(out[:, :, first:Tk], cells, estimate_s, lse[:, :, first:Tk])

    def _quadrant(self, quad, ctx, proj, kcs, q_ref_norm2, exact):
        N, R, D = quad.q.shape
        w, dev = quad.w, quad.q.device
        common = dict(scale=ctx.scale, key_ok=quad.key_ok, q_pos=quad.q_pos, k_pos=quad.k_pos, window=ctx.window)
        if exact:  # the split computes short quadrants exactly
            rows = torch.nonzero(quad.row_ok.reshape(-1)).squeeze(-1)
            group_keys = torch.arange(w, device=dev).expand(N, 1, w)
            res = grouped_attention(quad.q, quad.k, quad.v, rows, rows // R, group_keys, unique_rows=True, **common)
            return res.out, res.lse, res.cells, 0.0

        t0 = estimate_clock(quad.q)
        kf, qf = quad.k.float(), quad.q.float()
        k_n2 = (kf**2).sum(-1).masked_fill(~quad.key_ok, 0.0)  # [N, w]
        q_n2 = (qf**2).sum(-1).masked_fill(~quad.row_ok, 0.0)  # [N, R]
        mk2 = k_n2.amax(-1)
        mq2 = torch.where(q_ref_norm2 > 0, q_ref_norm2, mk2)
        radius2 = (mq2 + mk2)[:, None]
        # XBOX+: F(k) = [k, sqrt(M^2 - |k|^2), 0], G(q) = [q, 0, sqrt(M^2 - |q|^2)]; |F(k) - G(q)|^2
        # = const - 2 q.k for a query, so the nearest keys are the largest inner products.
        ext_k = torch.sqrt((radius2 - k_n2).clamp_min(0))
        ext_q = torch.sqrt((radius2 - q_n2).clamp_min(0))
        hk = kf @ proj[:, :D].T + ext_k[..., None] * proj[:, D]  # [N, w, n_hashes]
        hq = qf @ proj[:, :D].T + ext_q[..., None] * proj[:, D + 1]  # [N, R, n_hashes]
        hk = hk.masked_fill(~quad.key_ok[..., None], float("inf"))  # padding sorts last
        n_real = quad.key_ok.sum(-1)
        n_clu = -(-w // kcs)
        in_sorted = torch.arange(n_clu * kcs, device=dev)
        estimate = estimate_clock(quad.q) - t0

        out = lse = None
        cells = 0
        q_tags, k_tags = [], []
        for r in range(proj.shape[0]):
            t0 = estimate_clock(quad.q)
            hs, order = hk[..., r].sort(dim=-1, stable=True)
            where = locate(hs, n_real, hq[..., r].contiguous())
            q_clu = torch.where(quad.row_ok & (where >= 0), where // kcs, -1)  # [N, R]
            slots = torch.nn.functional.pad(order, (0, n_clu * kcs - w), value=-1)
            group_keys = torch.where(in_sorted[None] < n_real[:, None], slots, -1).view(N, n_clu, kcs)
            k_clu = torch.empty_like(order)
            k_clu.scatter_(1, order, (torch.arange(w, device=dev) // kcs).expand(N, w))
            k_clu = k_clu.masked_fill(~quad.key_ok, -2)
            rows = torch.nonzero(q_clu.reshape(-1) >= 0).squeeze(-1)
            groups = (rows // R) * n_clu + q_clu.reshape(-1)[rows]
            tags = {}
            if q_tags:  # keys this query already met in an earlier round are excluded
                tags = dict(q_tags=torch.stack(q_tags, -1), k_tags=torch.stack(k_tags, -1))
            estimate += estimate_clock(quad.q) - t0
            res = grouped_attention(
                quad.q, quad.k, quad.v, rows, groups, group_keys, row_tile=self.params.q_cluster_size, **tags,
                unique_rows=True, **common,  # rows: a nonzero, one cluster each
            )
            out, lse = (res.out, res.lse) if out is None else merge(out, lse, res.out, res.lse)
            cells += res.cells
            q_tags.append(q_clu)
            k_tags.append(k_clu)
        return out, lse, cells, estimate

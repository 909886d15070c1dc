"""Routing Transformer attention, training-free: online spherical k-means routes queries to keys.

Each head's normalised queries and keys are clustered with one shared set of spherical k-means
centroids fitted at run time; every query attends the keys of its own cluster (causally) plus a
local window. Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse Attention with Routing
Transformers", TACL 2021 (arXiv:2003.05997).

How it runs here. The queries are processed in estimation chunks. Before chunk c, the centroids have
seen the keys and queries of chunks 0..c-1 only (online k-means: the first chunk is fitted with
`kmeans_iters` Lloyd iterations from strided data points, each later chunk is folded in with one
assignment / update step on running cluster sums, and clusters still empty are re-seeded from new
points). The keys before chunk c are assigned to clusters the balanced way (each cluster takes its
`cluster_keys` nearest keys, so a key may sit in several clusters or none); keys inside chunk c
belong to their nearest centroid. A query of chunk c attends its local blocks (block kernel) and the
keys of its nearest centroid's cluster before its local window (token-gather kernel), the two parts
merged through their log-sum-exp. As in the paper's implementation, queries are sorted by cluster
and cut into groups (each cluster's run padded to whole groups of about four mean cluster runs, at
most `block_size` rows), so each group gathers one cluster's keys only and no query computes scores
against another cluster's keys.

Hyperparameters:
- `num_clusters`: centroids per head (None: sqrt(T), the paper's choice minimising O(nkd + n^2 d/k)).
- `cluster_keys`: keys before the chunk taken by each cluster (None: T / num_clusters, the balanced
  cluster size: lucidrains' window_size = seq_len / num_clusters).
- `local_blocks`: latest key blocks every query attends, its own block included (the paper pairs
  routing heads with local-attention heads; here every head gets both).
- `chunk_size`: estimation chunk in tokens, a multiple of `block_size` (None: T / 8 rounded to
  blocks, at least 4 blocks).
- `kmeans_iters`: Lloyd iterations of the first fit (lucidrains' KMEAN_INIT_ITERS = 10).
- `density`: target measured density in (0, 1]; sets `cluster_keys` per chunk from the layout so the
  measured density lands near it: the chunk's causal cells times `density`, minus its local cells
  and the expected in-chunk cluster keys (1 / num_clusters of the keys between the chunk start and
  each query's local window), divided by its queries (1 keeps every causal block: dense).
- `block_size`: kernel block size for the local part (16..512).

Deviations from the paper, and why:
- Training-free: the paper learns the centroids by EMA during training (with a commitment loss);
  here they are fitted online on the input itself, with running sums instead of an EMA of 0.999.
- Causality (leak-free): centroids used for chunk c are fitted only on data before chunk c, key
  membership uses only the key itself and those centroids (balanced top-w only among earlier keys),
  and a query's cluster is its own nearest centroid, so no output depends on a later token. The paper
  balances queries too (top-w queries per cluster), which would let a later query push an earlier one
  out of its cluster; here every query joins its nearest cluster.
- The first estimation chunk has no centroids yet; it runs dense causal attention (a small part,
  about 1/64 of the cells at the default chunk of T/8).
- The paper averages the outputs of a token routed to several clusters (scatter_mean); here each query
  has one cluster and its routed and local parts are merged exactly through the log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attnsieve.kernels import BlockSupport, block_sparse_attention, merge, token_gather_attention
from attnsieve.methods.base import AttnOutput, Method, estimate_clock
from attnsieve.methods.registry import register
from attnsieve.methods.selection import block_layout, forced_blocks


@dataclass
class RoutingParams:
    num_clusters: int | None = field(default=None, metadata={"help": "centroids per head (>= 1; None: sqrt(T))"})
    cluster_keys: int | None = field(
        default=None, metadata={"help": "earlier keys taken by each cluster (>= 0; None: T / num_clusters)"}
    )
    local_blocks: int = field(default=2, metadata={"help": "latest key blocks always attended, own block included"})
    chunk_size: int | None = field(
        default=None, metadata={"help": "estimation chunk in tokens, a multiple of block_size (None: T / 8)"}
    )
    kmeans_iters: int = field(default=10, metadata={"help": "Lloyd iterations of the first k-means fit (>= 1)"})
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides cluster_keys when set"}
    )
    block_size: int = field(default=64, metadata={"help": "kernel block size for the local part (16..512)"})

    def __post_init__(self):
        if self.num_clusters is not None and self.num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1 or None, got {self.num_clusters}")
        if self.cluster_keys is not None and self.cluster_keys < 0:
            raise ValueError(f"cluster_keys must be >= 0 or None, got {self.cluster_keys}")
        if self.local_blocks < 1:
            raise ValueError(f"local_blocks must be >= 1 (the diagonal block), got {self.local_blocks}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.chunk_size is not None and (self.chunk_size < self.block_size or self.chunk_size % self.block_size):
            raise ValueError(
                f"chunk_size must be a positive multiple of block_size={self.block_size}, got {self.chunk_size}"
            )
        if self.kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be >= 1, got {self.kmeans_iters}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")


class OnlineSphericalKMeans:
    """Per (batch row, head) spherical k-means over a stream of point chunks, centroids [B, H, K, D]."""

    def __init__(self, B: int, H: int, K: int, D: int, device):
        self.sums = torch.zeros(B, H, K, D, device=device)
        self.counts = torch.zeros(B, H, K, device=device)
        self.means = torch.zeros(B, H, K, D, device=device)
        self._seeded = torch.zeros(B, H, K, dtype=torch.bool, device=device)

    def active(self) -> torch.Tensor:
        """[B, H, K] bool: clusters that hold at least one point."""
        return self.counts > 0

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest active centroid of each point, x [B, H, n, D] unit rows -> [B, H, n] (-1: none active)."""
        sim = (x @ self.means.transpose(-1, -2)).masked_fill(~self.active()[:, :, None], float("-inf"))
        a = sim.argmax(-1)
        return torch.where(self.active().any(-1, keepdim=True), a, torch.full_like(a, -1))

    def _seed(self, x: torch.Tensor, ok: torch.Tensor) -> None:
        """Empty clusters take farthest-point seeds among the real points of x (deterministic).

        Each empty cluster in turn takes the real point least similar to every centroid so far
        (active ones and seeds already placed), as k-means++ does without the sampling.
        """
        empty = ~self.active()  # [B, H, K]
        self._seeded = torch.zeros_like(empty)
        takes = empty & ok.any(-1, keepdim=True)  # [B, H, K] the (row, head) pairs each cluster seeds
        todo = takes.flatten(0, 1).any(0).tolist()  # one host read for every cluster
        if not any(todo):
            return
        live = self.active()
        best = (x @ self.means.transpose(-1, -2)).masked_fill(~live[:, :, None], float("-inf")).amax(-1)
        for j in range(self.means.shape[2]):
            if not todo[j]:
                continue
            take = takes[:, :, j]  # [B, H]
            pick = best.masked_fill(~ok, float("inf")).argmin(-1)  # [B, H] farthest real point
            seed = torch.gather(x, 2, pick[:, :, None, None].expand(-1, -1, 1, x.shape[-1]))[:, :, 0]
            self.means[:, :, j] = torch.where(take[..., None], seed, self.means[:, :, j])
            self._seeded[:, :, j] = take
            best = torch.where(take[..., None], torch.maximum(best, (x @ seed[..., None])[..., 0]), best)

    def fold(self, x: torch.Tensor, ok: torch.Tensor, iters: int) -> None:
        """Add points x [B, H, n, D] (unit rows; ok [B, H, n] marks real ones) to the clustering."""
        if x.shape[2] == 0 or not bool(ok.any()):
            return
        self._seed(x, ok)
        live = self.active() | self._seeded
        K = self.means.shape[2]
        for _ in range(iters):
            sim = (x @ self.means.transpose(-1, -2)).masked_fill(~live[:, :, None], float("-inf"))
            a = torch.where(ok, sim.argmax(-1), K)  # K: "no cluster"
            onehot = F.one_hot(a, K + 1)[..., :K].to(x.dtype)  # [B, H, n, K]
            new_sums = onehot.transpose(-1, -2) @ x  # [B, H, K, D]
            new_counts = onehot.sum(2)
            tot = self.sums + new_sums
            filled = (self.counts + new_counts) > 0
            self.means = torch.where(filled[..., None], F.normalize(tot, dim=-1), self.means)
        self.sums = self.sums + new_sums
        self.counts = self.counts + new_counts


def _cluster_lists(past_idx: torch.Tensor, key_cluster: torch.Tensor, start: int, K: int) -> torch.Tensor:
    """Key positions of every cluster: [B, H, K, w + m] (-1 unused).

    past_idx [B, H, K, w]: balanced members before the chunk; key_cluster [B, H, n]: nearest cluster
    of each key in the chunk (-1 none), at positions start + i.
    """
    B, H, n = key_cluster.shape
    a = torch.where(key_cluster >= 0, key_cluster, K)
    order = torch.argsort(a, dim=-1, stable=True)  # keys sorted by cluster, then position
    counts = F.one_hot(a, K + 1)[..., :K].sum(2)  # [B, H, K]
    m = max(1, int(counts.max())) if n else 1
    starts = counts.cumsum(-1) - counts
    slot = torch.arange(m, device=a.device)
    pos_sorted = (starts[..., None] + slot).clamp(max=max(n - 1, 0))  # [B, H, K, m]
    inside = torch.gather(order, -1, pos_sorted.view(B, H, -1)).view(B, H, K, m) + start if n else pos_sorted
    inside = torch.where(slot < counts[..., None], inside, torch.full_like(inside, -1))
    return torch.cat([past_idx, inside], dim=-1)


@register(
    "routing",
    family="clustering",
    phases=("prefill",),
    params=RoutingParams,
    summary="Routing Transformer: online spherical k-means on q/k per head; attend own cluster + local blocks.",
)
class Routing(Method):
    exact_params = {"density": 1.0}  # every causal block kept: equals dense attention

    def prefill(self, q, k, v, ctx):
        p = self.params
        t0 = estimate_clock(q)
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G = H // Hkv
        bs = p.block_size
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, q.device)
        cs = p.chunk_size or max(4 * bs, round(Tk / 8 / bs) * bs)
        qb = torch.arange(layout.first_qb, layout.first_qb + layout.n_q, device=q.device)
        if p.density is not None and p.density >= 1:
            rows = layout.allowed
        else:  # local blocks, and every causal block for the first chunk (no centroids yet)
            first_chunk = (qb * bs < cs)[None, :, None]
            rows = forced_blocks(layout, 0, p.local_blocks) | (layout.allowed & first_chunk)
        support = BlockSupport.from_mask(rows[:, None].expand(B, Hkv, -1, -1), bs)
        estimate_s = estimate_clock(q) - t0
        res = block_sparse_attention(
            q, k, v, support, causal=True, window=ctx.window, scale=ctx.scale, key_valid=ctx.key_valid
        )
        out, lse, cells = res.out, res.lse, res.cells
        if (p.density is not None and p.density >= 1) or Tk <= cs:
            return AttnOutput(out, cells, estimate_s, lse)

        t0 = estimate_clock(q)
        K = p.num_clusters or max(1, round(math.sqrt(Tk)))
        g = max(1, min(bs, 4 * cs // K))  # rows per gathered group: ~4 mean cluster runs, fewer key gathers
        key_ok = torch.ones(B, Tk, dtype=torch.bool, device=q.device) if ctx.key_valid is None else ctx.key_valid
        q_ok = key_ok[:, Tk - Tq :]
        kn = F.normalize(k.float(), dim=-1)  # [B, Hkv, Tk, D]
        qn = F.normalize(q.float(), dim=-1)  # [B, H, Tq, D]
        km = OnlineSphericalKMeans(B, H, K, D, q.device)
        tok_out = torch.zeros(B, H, Tq, v.shape[-1], dtype=out.dtype, device=q.device)
        tok_lse = torch.full((B, H, Tq), float("-inf"), dtype=lse.dtype, device=q.device)
        key_prefix = F.pad(key_ok.long().cumsum(-1), (1, 0))  # [B, Tk + 1] real keys before t
        n_chunks = -(-Tk // cs)
        last_q_chunk = n_chunks - 1
        for c in range(n_chunks):
            s_c, e_c = c * cs, min((c + 1) * cs, Tk)
            qs = max(s_c, Tk - Tq)
            if c >= 1 and e_c > qs:
                estimate_s += estimate_clock(q) - t0
                cells += self._route_chunk(
                    q, k, v, ctx, km, kn, qn, key_ok, q_ok, key_prefix, s_c, e_c, qs, K, g, tok_out, tok_lse
                )
                t0 = estimate_clock(q)
            if c < last_q_chunk:  # fold chunk c into the centroids used from chunk c + 1 on
                xk = kn[:, :, None, s_c:e_c].expand(B, Hkv, G, e_c - s_c, D).reshape(B, H, e_c - s_c, D)
                okk = key_ok[:, None, s_c:e_c].expand(B, H, -1)
                lo = max(s_c, Tk - Tq) - (Tk - Tq)
                hi = max(e_c, Tk - Tq) - (Tk - Tq)
                x = torch.cat([xk, qn[:, :, lo:hi]], dim=2)
                ok = torch.cat([okk, q_ok[:, None, lo:hi].expand(B, H, -1)], dim=2)
                km.fold(x, ok, p.kmeans_iters if c == 0 else 1)
        estimate_s += estimate_clock(q) - t0
        out, lse = merge(out, lse, tok_out, tok_lse)
        return AttnOutput(out, cells, estimate_s, lse)

    def _cluster_keys(self, key_prefix, q_pos, q_real, s_c, K) -> torch.Tensor:
        """Earlier keys per cluster for one chunk, [B]: the parameter, or sized from `density`."""
        p = self.params
        B = key_prefix.shape[0]
        Tk = key_prefix.shape[1] - 1
        n_past = key_prefix[:, s_c]  # [B] real keys before the chunk
        if p.density is None:
            w = p.cluster_keys if p.cluster_keys is not None else -(-Tk // K)
            return torch.minimum(torch.full((B,), w, device=n_past.device), n_past)
        bs = p.block_size
        local = ((q_pos // bs - p.local_blocks + 1) * bs).clamp_min(0)  # [n] first local key
        full = key_prefix[:, q_pos + 1]  # [B, n] real keys at or before each query
        loc = full - key_prefix[:, local]
        inner = (key_prefix[:, local] - key_prefix[:, s_c : s_c + 1]).clamp_min(0)
        qr = q_real.double()
        target = p.density * (full * qr).sum(-1)
        have = (loc * qr).sum(-1) + (inner * qr).sum(-1) / K
        w = torch.round((target - have) / qr.sum(-1).clamp_min(1)).long()
        return torch.minimum(w.clamp_min(0), n_past)

    def _route_chunk(self, q, k, v, ctx, km, kn, qn, key_ok, q_ok, key_prefix, s_c, e_c, qs, K, g, tok_out, tok_lse):
        """Routed part of the queries in [qs, e_c): cluster keys before their local window."""
        p = self.params
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G = H // Hkv
        bs = p.block_size
        dev = q.device
        off = Tk - Tq
        n = e_c - qs
        active = km.active()  # [B, H, K]
        # Balanced members among earlier keys: each cluster's `w` nearest real keys.
        sim = kn[:, :, None, :s_c] @ km.means.view(B, Hkv, G, K, D).transpose(-1, -2)  # [B, Hkv, G, s_c, K]
        sim = sim.reshape(B, H, s_c, K).transpose(-1, -2)  # [B, H, K, s_c]
        sim = sim.masked_fill(~key_ok[:, None, None, :s_c] | ~active[..., None], float("-inf"))
        q_pos = torch.arange(qs, e_c, device=dev)
        w = self._cluster_keys(key_prefix, q_pos, q_ok[:, qs - off : e_c - off], s_c, K)  # [B]
        w_max = max(1, int(w.max()))
        vals, idx = sim.topk(min(w_max, s_c), dim=-1)  # [B, H, K, w]
        take = (vals > float("-inf")) & (torch.arange(idx.shape[-1], device=dev) < w[:, None, None, None])
        past_idx = torch.where(take, idx, torch.full_like(idx, -1))
        # Keys inside the chunk join their nearest cluster; queries too.
        xk = kn[:, :, None, s_c:e_c].expand(B, Hkv, G, e_c - s_c, D).reshape(B, H, e_c - s_c, D)
        k_cl = km.assign(xk).masked_fill(~key_ok[:, None, s_c:e_c], -1)
        q_cl = km.assign(qn[:, :, qs - off : e_c - off]).masked_fill(~q_ok[:, None, qs - off : e_c - off], -1)
        lists = _cluster_lists(past_idx, k_cl, s_c, K)  # [B, H, K, M]

        # Queries sorted by cluster, each cluster's run padded to whole groups of g rows.
        a = torch.where(q_cl >= 0, q_cl, K)
        order = torch.argsort(a, dim=-1, stable=True)  # [B, H, n]
        a_sorted = torch.gather(a, -1, order)
        counts = F.one_hot(a, K + 1)[..., :K].sum(2)  # [B, H, K]
        padded = -(-counts // g) * g
        offs = padded.cumsum(-1) - padded
        starts = counts.cumsum(-1) - counts
        real = a_sorted < K
        a_c = a_sorted.clamp(max=K - 1)
        rank = torch.arange(n, device=dev) - torch.gather(starts, -1, a_c)
        fake = torch.where(real, torch.gather(offs, -1, a_c) + rank, torch.full_like(rank, -1))
        Tf = max(g, -(-int(padded.sum(-1).max()) // g) * g)
        slot = torch.where(real, fake, torch.full_like(fake, Tf))  # Tf: a discard row
        qf = q.new_zeros(B, H, Tf + 1, D)
        qf.scatter_(2, slot[..., None].expand(-1, -1, -1, D), torch.gather(q[:, :, qs - off :], 2,
                                                                           order[..., None].expand(-1, -1, -1, D)))
        pos_f = torch.full((B, H, Tf + 1), -1, dtype=torch.long, device=dev)
        pos_f.scatter_(2, slot, qs + order)
        cl_f = torch.full((B, H, Tf + 1), -1, dtype=torch.long, device=dev)
        cl_f.scatter_(2, slot, torch.where(real, a_sorted, -1))
        qf, pos_f, cl_f = qf[:, :, :Tf], pos_f[:, :, :Tf], cl_f[:, :, :Tf]

        item_cl = cl_f[:, :, ::g]  # [B, H, NQf] cluster of each group (its first row is real)
        M = lists.shape[-1]
        tokens = torch.gather(lists, 2, item_cl.clamp_min(0)[..., None].expand(-1, -1, -1, M))
        tokens = torch.where((item_cl >= 0)[..., None], tokens, torch.full_like(tokens, -1))  # [B, H, NQf, M]
        rows = pos_f.view(B, H, Tf // g, g)[..., None]  # [B, H, NQf, g, 1]
        t = tokens[:, :, :, None, :]  # [B, H, NQf, 1, M]
        local_start = (rows // bs - p.local_blocks + 1) * bs
        row_mask = (t >= 0) & (rows >= 0) & (t <= rows) & (t < local_start)
        if ctx.window is not None:
            row_mask &= rows - t < ctx.window

        Tk_f = max(-(-e_c // g) * g, Tf)
        kc, vc = k[:, :, :e_c], v[:, :, :e_c]
        if Tk_f > e_c:
            kc = F.pad(kc, (0, 0, 0, Tk_f - e_c))
            vc = F.pad(vc, (0, 0, 0, Tk_f - e_c))
        res = token_gather_attention(qf, kc, vc, tokens, g, causal=False, scale=ctx.scale, row_mask=row_mask)
        src = torch.where(real, order, torch.full_like(order, n))  # n: a discard column
        gathered_o = torch.gather(res.out, 2, fake.clamp(0, Tf - 1)[..., None].expand(-1, -1, -1, res.out.shape[-1]))
        gathered_l = torch.gather(res.lse, 2, fake.clamp(0, Tf - 1))
        o_full = tok_out.new_zeros(B, H, n + 1, tok_out.shape[-1])
        l_full = tok_lse.new_full((B, H, n + 1), float("-inf"))
        o_full.scatter_(2, src[..., None].expand_as(gathered_o), gathered_o.to(o_full.dtype))
        l_full.scatter_(2, src, gathered_l.to(l_full.dtype))
        tok_out[:, :, qs - off : e_c - off] = o_full[:, :, :n]
        tok_lse[:, :, qs - off : e_c - off] = l_full[:, :, :n]
        return res.cells

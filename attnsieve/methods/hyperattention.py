"""HyperAttention: exact attention inside hash-sorted blocks plus a sampled residual, causal by recursion.

Queries and keys are hashed with sortLSH (signs of random projections, buckets visited in Gray
order) and each query attends exactly the block of hash-sorted keys nearest its own hash; a
uniform sample of the remaining keys, reweighted by keys/samples, estimates the rest of the
softmax. Han, Jayaram, Karbasi, Mirrokni, Woodruff, Zandieh, "HyperAttention: Long-context
Attention in Near-Linear Time", ICLR 2024 (arXiv:2310.05587); reference insuhan/hyper-attn.

Causal layers follow the paper's recursion (see `_hashing`): the two diagonal halves recurse, the
lower-left quadrant (all keys before all queries) runs the non-causal estimator, diagonal leaves
at or below `min_seq_len` are exact, and so is a quadrant whose query half is shorter than
`min_seq_len` (the reference's rule). Hash-sorted blocks and the residual never double count:
samples that fall in the query's own block are excluded, and the residual is weighted by
(real keys of the quadrant) / sample_size.

Hyperparameters (paper/repository defaults): `lsh_num_projs` (7: 128 buckets), `block_size`
(256 keys per hash-sorted block), `sample_size` (256 residual samples per head and quadrant),
`min_seq_len` (4096: exact below; at short test lengths set it small), `seed` (projections and
samples), `density` (when set, overrides min_seq_len and, if even the smallest exact leaves
overshoot, halves block_size and sample_size down to 16, choosing from the shapes alone the
setting whose predicted density is nearest the target; measured density counts every cell
computed: exact leaves and quadrants, hash blocks and residual samples).

Deviations, and why:
- Leak-free matching. The reference sorts the quadrant's queries too and pairs the i-th query
  block with the i-th key block, so which keys a query sees depends on the hashes of other,
  later queries (a causal leak). Here each query attends the key block that holds the key
  nearest its own hash in the hash-sorted keys of the quadrant (`searchsorted`; the middle of
  its bucket when the bucket is not empty), so it depends only on itself and on past keys.
- Samples come from a generator fixed by `seed`, the layer and the recursion level, drawn per
  query head and quadrant, shared by the batch rows; never from the data, so no token (or other
  batch row) influences another's samples.
- Buckets are visited in reflected Gray order (adjacent buckets differ in one hyperplane), as
  the paper describes; the reference sorts by the Gray code of the bucket id, whose order is
  not a one-bit path beyond two hyperplanes.
- Left padding: padding keys sort last and are never attended nor sampled; the sample weight
  uses the quadrant's real keys. On a sliding layer keys beyond the window are masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.kernels import merge
from attnsieve.kernels.grouped import grouped_attention
from attnsieve.methods._hashing import (
    SplitGrid,
    angular_hash,
    causal_split,
    generator,
    gray_rank,
    leaf_attention,
    locate,
    min_seq_len_for_density,
)
from attnsieve.methods.base import AttnOutput, Method, estimate_clock
from attnsieve.methods.registry import register


@dataclass
class HyperAttentionParams:
    lsh_num_projs: int = field(default=7, metadata={"help": "random hyperplanes of sortLSH (1..16; 2**n buckets)"})
    block_size: int = field(default=256, metadata={"help": "keys per hash-sorted block (16..512)"})
    sample_size: int = field(default=256, metadata={"help": "uniform residual samples per head and quadrant (>= 0)"})
    min_seq_len: int = field(default=4096, metadata={"help": "exact attention at or below this length (>= 1)"})
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides min_seq_len (and sizes)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the projections and residual samples (>= 0)"})

    def __post_init__(self):
        if not 1 <= self.lsh_num_projs <= 16:
            raise ValueError(f"lsh_num_projs must be in [1, 16], got {self.lsh_num_projs}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.sample_size < 0:
            raise ValueError(f"sample_size must be >= 0, got {self.sample_size}")
        if self.min_seq_len < 1:
            raise ValueError(f"min_seq_len must be >= 1, got {self.min_seq_len}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def quadrant_cost(block_size: int, sample_size: int):
    """Expected cells per query of a hashed quadrant with nk keys: its block plus kept samples."""

    def cost(nk: int) -> float:
        if nk <= block_size:
            return float(nk)
        return block_size + sample_size * (1 - block_size / nk)

    return cost


def budget(p: HyperAttentionParams, Tq: int, Tk: int) -> tuple[int, int, int]:
    """(min_seq_len, block_size, sample_size) the call runs with."""
    if p.density is None:
        return p.min_seq_len, p.block_size, p.sample_size
    bs, s = p.block_size, p.sample_size
    while True:
        m, pred = min_seq_len_for_density(p.density, Tq, Tk, quadrant_cost(bs, s))
        if pred <= 1.2 * p.density or (bs <= 16 and s <= 16):
            return m, bs, s
        bs, s = max(16, bs // 2), (max(16, s // 2) if s else 0)


@register(
    "hyperattention",
    family="hashing",
    phases=("prefill",),
    params=HyperAttentionParams,
    summary="HyperAttention: sortLSH blocks + sampled residual, causal by recursive split (leak-free matching).",
)
class HyperAttention(Method):
    exact_params = {"min_seq_len": 1 << 30}  # one exact leaf: equals dense attention

    def prefill(self, q, k, v, ctx):
        p = self.params
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        t0 = estimate_clock(q)
        min_seq_len, bs, s = budget(p, Tq, Tk)
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
        proj = torch.randn(D, p.lsh_num_projs, generator=generator(p.seed, ctx.layer_idx)).to(q.device)
        rank = gray_rank(p.lsh_num_projs, q.device)
        for level in range(split.levels):
            quad = grid.quadrants(split.leaf << level)
            if quad.w < min_seq_len:  # the reference computes short quadrants exactly
                o, l, c, est = self._exact_quadrant(quad, ctx)
            else:
                o, l, c, est = self._hashed_quadrant(quad, ctx, proj, rank, bs, s, level)
            estimate_s += est
            grid.merge_quadrant(out, lse, quad, o, l)
            cells += c
        return AttnOutput(out[:, :, first:Tk], cells, estimate_s, lse[:, :, first:Tk])

    @staticmethod
    def _exact_quadrant(quad, ctx):
        N, R, _ = quad.q.shape
        rows = torch.nonzero(quad.row_ok.reshape(-1)).squeeze(-1)
        group_keys = torch.arange(quad.w, device=quad.q.device).expand(N, 1, quad.w)
        res = grouped_attention(
            quad.q, quad.k, quad.v, rows, rows // R, group_keys, scale=ctx.scale, key_ok=quad.key_ok,
            q_pos=quad.q_pos, k_pos=quad.k_pos, window=ctx.window, unique_rows=True,  # rows: a nonzero
        )
        return res.out, res.lse, res.cells, 0.0

    def _hashed_quadrant(self, quad, ctx, proj, rank, bs, s, level):
        """sortLSH blocks (each query the block nearest its own hash) + residual samples."""
        t0 = estimate_clock(quad.q)
        N, R, _ = quad.q.shape
        w, dev = quad.w, quad.q.device
        sentinel = rank.numel()  # sorts after every bucket
        hk = angular_hash(quad.k, proj, rank).masked_fill(~quad.key_ok, sentinel)  # [N, w]
        hk_sorted, order = hk.sort(dim=-1, stable=True)
        n_real = quad.key_ok.sum(-1)  # [N]
        hq = angular_hash(quad.q, proj, rank)  # [N, R]
        where = locate(hk_sorted, n_real, hq)  # [N, R] sorted index of the nearest key
        q_block = torch.where(quad.row_ok & (where >= 0), where // bs, -1)
        n_blk = -(-w // bs)
        slots = torch.nn.functional.pad(order, (0, n_blk * bs - w), value=-1)
        rank_in_sorted = torch.arange(n_blk * bs, device=dev)
        slots = torch.where(rank_in_sorted[None] < n_real[:, None], slots, -1)  # padding keys never join
        group_keys = slots.view(N, n_blk, bs)
        rows = torch.nonzero(q_block.reshape(-1) >= 0).squeeze(-1)
        groups = (rows // R) * n_blk + q_block.reshape(-1)[rows]
        estimate = estimate_clock(quad.q) - t0
        common = dict(scale=ctx.scale, key_ok=quad.key_ok, q_pos=quad.q_pos, k_pos=quad.k_pos, window=ctx.window)
        res = grouped_attention(quad.q, quad.k, quad.v, rows, groups, group_keys, unique_rows=True, **common)
        out, lse, cells = res.out, res.lse, res.cells
        if s == 0:
            return out, lse, cells, estimate

        # Residual: per query head and quadrant, s keys drawn uniformly (with replacement) from
        # the quadrant's real keys; those in the query's own block are excluded (already exact).
        t0 = estimate_clock(quad.q)
        G, Hkv = R // w, quad.n_kv
        # one draw per (kv head, query head, segment), shared by the batch rows
        u = torch.rand(Hkv, G, quad.n_seg, s, generator=generator(self.params.seed, ctx.layer_idx, 1000 + level))
        u = u.to(dev)[quad.kv_head, :, quad.seg]  # [N, G, s]
        pick = torch.minimum((u * n_real[:, None, None]).long(), (n_real - 1).clamp_min(0)[:, None, None])
        sample_keys = torch.gather(order, 1, pick.view(N, -1)).view(N, G, s)
        sample_keys = torch.where((n_real > bs)[:, None, None], sample_keys, -1)  # one block holds them all
        key_block = torch.empty_like(order)
        key_block.scatter_(1, order, (torch.arange(w, device=dev) // bs).expand(N, w))
        groups = (rows // R) * G + quad.head.reshape(-1)[rows]
        estimate += estimate_clock(quad.q) - t0
        res = grouped_attention(
            quad.q, quad.k, quad.v, rows, groups, sample_keys, q_tags=q_block[..., None], k_tags=key_block[..., None],
            unique_rows=True, **common,
        )
        weight = torch.log(n_real.clamp_min(1).to(torch.float64) / s).to(res.lse.dtype)  # keys / samples
        out, lse = merge(out, lse, res.out, res.lse + weight[:, None])
        return out, lse, cells + res.cells, estimate


"""Shared machinery of the hashing methods (hyperattention, lsh): the causal split, hashes, budgets.

HyperAttention (Han et al., ICLR 2024, arXiv:2310.05587) handles a causal layer by splitting it
recursively: the two diagonal halves are causal problems of half the size, and the lower-left
quadrant (second-half queries against first-half keys) is non-causal, because every one of its
keys precedes every one of its queries. Below `min_seq_len` a diagonal block is computed exactly.
We lay the recursion on a grid padded at the end to leaf * 2**levels, so every quadrant of one
level has the same shape and one level runs as one batched call; the reference pads odd lengths
with a zero row at the end at each level, which is the same split. Both hashing methods use it:
it makes every hashed key set a set of past keys, which is what a leak-free hash sort needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnsieve.kernels import BlockSupport, SparseResult, block_sparse_attention, merge
from attnsieve.methods.selection import block_layout

ALIGN = 16  # leaf lengths are multiples of this, so the exact leaves run on the block kernel


@dataclass
class CausalSplit:
    leaf: int  # length of the exact diagonal leaves
    levels: int  # number of quadrant levels (0: one exact leaf covers everything)
    padded: int  # leaf * 2**levels >= Tk


def causal_split(Tk: int, min_seq_len: int) -> CausalSplit:
    """Halve [0, Tk) until the diagonal leaves are at most max(min_seq_len, ALIGN) long."""
    if Tk <= min_seq_len:
        return CausalSplit(Tk, 0, Tk)
    limit = max(min_seq_len, ALIGN)
    levels = 0
    while _leaf(Tk, levels) > limit:
        levels += 1
    leaf = _leaf(Tk, levels)
    return CausalSplit(leaf, levels, leaf << levels)


def _leaf(Tk: int, levels: int) -> int:
    n = -(-Tk // (1 << levels))
    return -(-n // ALIGN) * ALIGN


def leaf_attention(q, k, v, split: CausalSplit, *, scale, key_valid, window) -> SparseResult:
    """Exact causal attention inside every leaf (block diagonal), on the block-sparse kernel."""
    return diagonal_attention(q, k, v, split.leaf if split.levels else None, scale=scale, key_valid=key_valid,
                              window=window)


def diagonal_attention(q, k, v, seg_len: int | None, *, scale, key_valid, window) -> SparseResult:
    """Exact causal attention inside consecutive segments of `seg_len` positions (None: one segment).

    seg_len must be a multiple of ALIGN; the segments run as a block-diagonal support.
    """
    B, Tq, Tk = q.shape[0], q.shape[2], k.shape[2]
    Hkv = k.shape[1]
    bs = 64 if seg_len is None else next(b for b in (64, 32, 16) if seg_len % b == 0)
    layout = block_layout(Tq, Tk, bs, key_valid, window, B, q.device)
    allowed = layout.allowed  # [B, NQ, NK]
    if seg_len is not None:
        per_seg = seg_len // bs
        qb = torch.arange(layout.first_qb, layout.first_qb + layout.n_q, device=q.device)
        start = (qb // per_seg) * per_seg  # first key block of each query block's segment
        allowed = allowed & (torch.arange(layout.n_k, device=q.device)[None, :] >= start[:, None])[None]
    support = BlockSupport.from_mask(allowed[:, None].expand(B, Hkv, layout.n_q, layout.n_k), bs)
    return block_sparse_attention(q, k, v, support, causal=True, window=window, scale=scale, key_valid=key_valid)


@dataclass
class Quadrants:
    """The lower-left quadrants of one level as N = B * Hkv * n_seg independent items.

    Item rows are the G query heads of a KV group over the w second-half positions (head-major);
    item keys are the w first-half positions. Every key of an item precedes every row.
    """

    q: torch.Tensor  # [N, G * w, D]
    k: torch.Tensor  # [N, w, D]
    v: torch.Tensor  # [N, w, Dv]
    key_ok: torch.Tensor  # [N, w] real keys (inside Tk, not padding)
    row_ok: torch.Tensor  # [N, G * w] real queries
    q_pos: torch.Tensor  # [N, G * w] absolute positions
    k_pos: torch.Tensor  # [N, w]
    head: torch.Tensor  # [N, G * w] query head of each row inside its KV group
    seg: torch.Tensor  # [N] segment index of each item
    kv_head: torch.Tensor  # [N] KV head of each item
    w: int
    n_seg: int
    n_kv: int  # KV heads


class SplitGrid:
    """q, k, v laid on the padded grid of a causal split, with the running output of every position."""

    def __init__(self, q, k, v, split: CausalSplit, key_valid):
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        P, first, dev = split.padded, Tk - Tq, q.device
        self.B, self.H, self.Hkv, self.G, self.P, self.first, self.Tk = B, H, Hkv, H // Hkv, P, first, Tk
        self.q = q.new_zeros(B, H, P, D)
        self.q[:, :, first:Tk] = q
        self.k = torch.nn.functional.pad(k, (0, 0, 0, P - Tk))
        self.v = torch.nn.functional.pad(v, (0, 0, 0, P - Tk))
        real = torch.zeros(B, P, dtype=torch.bool, device=dev)
        real[:, :Tk] = True if key_valid is None else key_valid.to(dev, torch.bool)
        self.key_ok = real
        self.q_ok = real.clone()
        self.q_ok[:, :first] = False

    def quadrants(self, w: int) -> Quadrants:
        B, Hkv, G, P = self.B, self.Hkv, self.G, self.P
        n_seg = P // (2 * w)
        N = B * Hkv * n_seg
        D, Dv = self.q.shape[-1], self.v.shape[-1]
        dev = self.q.device
        qr = self.q.view(B, Hkv, G, n_seg, 2, w, D)[:, :, :, :, 1].permute(0, 1, 3, 2, 4, 5).reshape(N, G * w, D)
        kq = self.k.view(B, Hkv, n_seg, 2, w, D)[:, :, :, 0].reshape(N, w, D)
        vq = self.v.view(B, Hkv, n_seg, 2, w, Dv)[:, :, :, 0].reshape(N, w, Dv)
        key_ok = self.key_ok.view(B, 1, n_seg, 2, w)[:, :, :, 0].expand(B, Hkv, n_seg, w).reshape(N, w)
        row_ok = self.q_ok.view(B, 1, n_seg, 1, 2, w)[:, :, :, :, 1].expand(B, Hkv, n_seg, G, w).reshape(N, G * w)
        seg = torch.arange(n_seg, device=dev)
        k_pos = (seg[:, None] * 2 * w + torch.arange(w, device=dev)).expand(B * Hkv, n_seg, w).reshape(N, w)
        q_pos = (k_pos + w).view(N, 1, w).expand(N, G, w).reshape(N, G * w)
        head = torch.arange(G, device=dev).repeat_interleave(w).expand(N, G * w)
        seg_of = seg.repeat(B * Hkv)
        kv_head = torch.arange(Hkv, device=dev).repeat_interleave(n_seg).repeat(B)
        return Quadrants(qr, kq, vq, key_ok, row_ok, q_pos, k_pos, head, seg_of, kv_head, w, n_seg, Hkv)

    def first_half_query_norm2(self, w: int) -> torch.Tensor:
        """[N] largest squared norm of the real queries at each item's key positions (the first half)."""
        B, Hkv, G, P = self.B, self.Hkv, self.G, self.P
        n2 = (self.q.float() ** 2).sum(-1).masked_fill(~self.q_ok[:, None], 0.0)  # [B, H, P]
        n_seg = P // (2 * w)
        return n2.view(B, Hkv, G, n_seg, 2, w)[:, :, :, :, 0].amax(dim=(2, 4)).reshape(-1)

    def merge_quadrant(self, out_full, lse_full, quad: Quadrants, out, lse):
        """Merge a level's item results [N, G*w, Dv] / [N, G*w] into the second-half positions."""
        B, H, Hkv, G, w, n = self.B, self.H, self.Hkv, self.G, quad.w, quad.n_seg
        Dv = out.shape[-1]
        o = out.view(B, Hkv, n, G, w, Dv).permute(0, 1, 3, 2, 4, 5).reshape(B, H, n, w, Dv)
        l = lse.view(B, Hkv, n, G, w).permute(0, 1, 3, 2, 4).reshape(B, H, n, w)
        of = out_full.view(B, H, n, 2, w, Dv)
        lf = lse_full.view(B, H, n, 2, w)
        mo, ml = merge(of[:, :, :, 1], lf[:, :, :, 1], o.to(out_full.dtype), l.to(lse_full.dtype))
        of[:, :, :, 1] = mo
        lf[:, :, :, 1] = ml


def gray_rank(n_bits: int, device=None) -> torch.Tensor:
    """rank[code] = position of `code` in the reflected Gray sequence (neighbours differ in one bit)."""
    i = torch.arange(1 << n_bits, device=device)
    rank = torch.empty_like(i)
    rank[i ^ (i >> 1)] = i
    return rank


def angular_hash(x: torch.Tensor, proj: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """sortLSH bucket of each row of x [..., D]: sign bits of x @ proj [D, P], in Gray order."""
    bits = (x.float() @ proj) > 0  # [..., P]
    code = (bits.long() << torch.arange(proj.shape[1], device=x.device)).sum(-1)
    return rank[code]


def locate(sorted_vals: torch.Tensor, n_real: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index in the sorted keys of the key nearest to each query hash; -1 where an item has no key.

    sorted_vals: [N, K] ascending, real keys first (padding sorted last with a sentinel);
    n_real: [N]; x: [N, R]. Among equal hashes (a bucket) the middle one is taken.
    """
    lo = torch.searchsorted(sorted_vals, x, side="left")
    hi = torch.searchsorted(sorted_vals, x, side="right")
    last = (n_real - 1).clamp_min(0)[:, None]
    below = torch.minimum((lo - 1).clamp_min(0), last)
    above = torch.minimum(lo, last)
    d_below = (x - torch.gather(sorted_vals, 1, below)).abs()
    d_above = (torch.gather(sorted_vals, 1, above) - x).abs()
    nearest = torch.where(d_below <= d_above, below, above)
    idx = torch.where(hi > lo, torch.minimum((lo + hi - 1) // 2, last), nearest)
    return torch.where(n_real[:, None] > 0, idx, -1)


def generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator fixed by the method seed and call-site salts (layer, level, round)."""
    s = seed
    for x in salt:
        s = (s * 1_000_003 + x + 1) % (1 << 62)
    return torch.Generator().manual_seed(s)


def predicted_density(Tq: int, Tk: int, min_seq_len: int, cost: Callable[[int], float]) -> float:
    """Cells the split computes / exact causal cells, from shapes only (no padding, no window).

    cost(nk) gives the cells one query computes in a hashed quadrant with nk keys. Closed forms
    over the query positions [Tk - Tq, Tk), so the density search costs no tensor work.
    """
    split = causal_split(Tk, min_seq_len)
    first = Tk - Tq

    def tri(n: int, period: int) -> int:  # sum over p < n of (p mod period) + 1
        full, rest = divmod(n, period)
        return full * period * (period + 1) // 2 + rest * (rest + 1) // 2

    def second_halves(n: int, w: int) -> int:  # positions p < n with p mod 2w >= w
        full, rest = divmod(n, 2 * w)
        return full * w + max(0, rest - w)

    total = Tk * (Tk + 1) // 2 - first * (first + 1) // 2
    leaf = split.leaf if split.levels else Tk
    cells = float(tri(Tk, leaf) - tri(first, leaf))
    for level in range(split.levels):
        w = split.leaf << level
        per = w if w < min_seq_len else min(w, cost(w))
        cells += per * (second_halves(Tk, w) - second_halves(first, w))
    return cells / total


def min_seq_len_for_density(density: float, Tq: int, Tk: int, cost) -> tuple[int, float]:
    """The exact-leaf threshold whose predicted density is nearest to `density` (in ratio)."""
    cands = sorted({int(round(ALIGN * 2 ** (i / 4))) for i in range(64) if ALIGN * 2 ** (i / 4) < Tk} | {Tk})
    best = None
    for m in cands:
        d = predicted_density(Tq, Tk, m, cost)
        score = abs(math.log(max(d, 1e-9) / density))
        if best is None or score < best[0] - 1e-12:
            best = (score, m, d)
    return best[1], best[2]

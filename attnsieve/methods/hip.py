"""HiP: hierarchically pruned attention, a tree search for each query block's top-k keys.

The causal key range of a query block (after the attention-sink tokens, before its local window) is
split into k candidate chunks; every iteration halves each chunk, scores each half by one
representative key unit (its centre) against the block's queries, and keeps the k best halves, until
the chunks are single key units; the block then attends those k units, the sink and its local
window exactly. Estimation costs O(T log T). Lee et al., "A Training-Free Sub-quadratic Cost
Transformer Model Serving Framework With Hierarchically Pruned Attention", ICLR 2025
(arXiv:2406.09827); defaults from the reference implementation (DeepAuto-AI/hip-attention v1.1,
`HiPAttentionArgs`, read for understanding only).

Hyperparameters (paper/reference defaults):
- `mask_k` (512): key tokens each query block selects by the tree search (k = mask_k / block_size_k
  key units).
- `block_size` (64): query block b_q, also the block of the local band and of the kernel grid.
- `block_size_k` (2): key unit b_k, the granularity the search descends to.
- `block_stride_q` (2): every `block_stride_q`-th query of a block scores the representatives.
- `window` (256): local sliding window in tokens, always attended (block aligned: the diagonal block
  plus ceil(window / block_size) earlier blocks).
- `sink` (16): first real tokens always attended.
- `representative` ("center"): the key unit that stands for a half ("first" is the paper's other rule).
- `per_head` (True): one search per query head, as the reference does; False shares one per KV group.
- `density`: when set, overrides `mask_k` and `window`, scaling both by one factor so the measured
  density lands near it (the sink is kept); 1.0 is exact attention.

Deviations from the paper, and why:
- Causality: the reference scores each query block's representatives against its own queries (max
  over them), so a later token of the block changes the keys an earlier token sees. Here block j is
  scored with the queries of block j - 1 (every `block_stride_q`-th one), which all precede block j;
  the first block of a call falls back to its own first query (`_lagged.py`). The candidate range
  ends where block j's local window begins, so every scored key precedes block j.
- The initial k chunks split the candidate range evenly without the reference's power-of-two
  alignment, and a chunk of odd size splits into halves of ceil/floor size.
- The local window is block aligned (attended by the block kernel) rather than per-token; the
  selected units and the sink run through the token-gather kernel and merge exactly with it.
- The reference keeps the first layers dense and reuses masks across decoding steps; both are
  left to per-layer overrides (`layers=`) and decoding stays exact.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from attnsieve.kernels import BlockSupport, block_sparse_attention, merge, token_gather_attention
from attnsieve.methods._lagged import lagged_queries, real_query_rows
from attnsieve.methods.base import AttnOutput, Method
from attnsieve.methods.registry import register
from attnsieve.methods.selection import block_layout, forced_blocks

# Largest number of score + gathered key elements one batched scoring step may hold (~16 MB fp32).
SCORE_CHUNK_ELEMS = 1 << 22


@dataclass
class HipParams:
    mask_k: int = field(default=512, metadata={"help": "key tokens each query block selects by tree search (>= 1)"})
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides mask_k and window when set"}
    )
    block_size: int = field(default=64, metadata={"help": "query block b_q and kernel block (16..512)"})
    block_size_k: int = field(default=2, metadata={"help": "key unit b_k the search descends to (1..64)"})
    block_stride_q: int = field(default=2, metadata={"help": "every n-th query of a block scores keys (>= 1)"})
    window: int = field(default=256, metadata={"help": "local window in tokens, always attended (>= 0)"})
    sink: int = field(default=16, metadata={"help": "first real tokens always attended (>= 0)"})
    representative: Literal["center", "first"] = field(
        default="center", metadata={"help": "key unit that represents a half: center or first"}
    )
    per_head: bool = field(default=True, metadata={"help": "search per query head (True) or per KV group (False)"})

    def __post_init__(self):
        if self.mask_k < 1:
            raise ValueError(f"mask_k must be >= 1 token, got {self.mask_k}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if not 1 <= self.block_size_k <= 64:
            raise ValueError(f"block_size_k must be in [1, 64], got {self.block_size_k}")
        if not 1 <= self.block_stride_q <= self.block_size:
            raise ValueError(f"block_stride_q must be in [1, block_size={self.block_size}], got {self.block_stride_q}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0 tokens, got {self.window}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0 tokens, got {self.sink}")
        if self.representative not in ("center", "first"):
            raise ValueError(f"representative must be 'center' or 'first', got {self.representative!r}")


def _score_units(q_items, keys_flat, base, lo, hi, units, valid, b_k, Tk, buf=None):
    """Max over an item's representative queries and a unit's keys of q . k: [N, U] (-inf if invalid).

    q_items [N, R, D] (every row a real query); keys_flat [S * Tk, D]; base = seq * Tk, lo, hi [N];
    units, valid [N, U].
    """
    N, U = units.shape
    tok = lo[:, None, None] + units[..., None] * b_k + torch.arange(b_k, device=units.device)  # [N, U, b_k]
    ok = valid[..., None] & (tok < hi[:, None, None])
    flat = (base[:, None, None] + tok.clamp(0, Tk - 1)).view(-1)
    if buf is None or buf.numel() < flat.numel() * keys_flat.shape[1]:
        buf = keys_flat.new_empty(flat.numel() * keys_flat.shape[1])
    kg = buf[: flat.numel() * keys_flat.shape[1]].view(-1, keys_flat.shape[1])
    torch.index_select(keys_flat, 0, flat, out=kg)  # gathered into a reused buffer
    kg = kg.view(N, U * b_k, -1)  # [N, U * b_k, D]
    s = torch.bmm(q_items, kg.transpose(1, 2)).amax(1).view(N, U, b_k)  # max over the queries
    return s.masked_fill_(~ok, float("-inf")).amax(-1)


def hierarchical_topk(
    q_items: torch.Tensor,
    q_ok: torch.Tensor,
    keys: torch.Tensor,
    seq: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    k_units: int,
    b_k: int,
    representative: str = "center",
    chunk_elems: int = SCORE_CHUNK_ELEMS,
) -> tuple[torch.Tensor, int]:
    """HiP's tree search for every item at once: the k best key units of each item's range.

    An item is one query block of one support head: representative queries q_items [N, R, D] with
    q_ok [N, R], a key sequence keys[seq[i]] ([S, Tk, D]) and a token range [lo, hi) cut into units
    of b_k tokens. Returns (units [N, k_units] unit indices ascending, -1 unused; representatives
    scored). Items with at most k_units units keep them all and score nothing.
    """
    N = q_items.shape[0]
    dev = q_items.device
    n = torch.div((hi - lo).clamp_min(0) + b_k - 1, b_k, rounding_mode="floor")  # [N] units in range
    K = k_units
    slot = torch.arange(K, device=dev)
    out = torch.where(slot < n[:, None], slot.expand(N, K), torch.full((N, K), -1, device=dev))
    search = torch.nonzero(n > K).squeeze(-1)
    scored = 0
    if search.numel() == 0:
        return out, scored
    ns = n[search][:, None]
    start = torch.div(ns * slot, K, rounding_mode="floor")  # [A, K] the k initial chunks
    size = torch.div(ns * (slot + 1), K, rounding_mode="floor") - start
    R, D = q_items.shape[1], q_items.shape[2]
    Tk = keys.shape[1]
    keys_flat = keys.reshape(-1, D)
    # Padding rows repeat the item's first real query, so a plain max over rows ignores them.
    first_ok = q_ok.to(torch.int8).argmax(-1)
    q_items = torch.where(q_ok[..., None], q_items, q_items[torch.arange(N, device=dev), first_ok][:, None])
    per_item = 2 * K * b_k * (R + D)
    step = max(1, chunk_elems // per_item)
    buf = keys.new_empty(min(search.numel(), step) * 2 * K * b_k * D)
    while True:
        active = torch.nonzero((size > 1).any(-1)).squeeze(-1)
        if active.numel() == 0:
            break
        s, z = start[active], size[active]
        zl = torch.div(z + 1, 2, rounding_mode="floor")
        c_start = torch.stack([s, s + zl], -1).flatten(1)  # [A, 2K] the halves
        c_size = torch.stack([zl, z - zl], -1).flatten(1)
        valid = c_size > 0
        rep = c_start + (torch.div(c_size, 2, rounding_mode="floor") if representative == "center" else 0)
        items = search[active]
        score = torch.empty(c_start.shape, device=dev)
        for a in range(0, items.numel(), step):
            b = min(a + step, items.numel())
            it = items[a:b]
            score[a:b] = _score_units(
                q_items[it], keys_flat, seq[it] * Tk, lo[it], hi[it], rep[a:b], valid[a:b], b_k, Tk, buf
            )
        scored += int(valid.sum())
        keep = score.topk(K, dim=-1).indices  # every chunk has a non-empty half, so >= K are valid
        start[active] = torch.gather(c_start, 1, keep)
        size[active] = torch.gather(c_size, 1, keep)
    out[search] = start.sort(-1).values
    return out, scored


def _first_real(key_valid: torch.Tensor | None, B: int, device) -> torch.Tensor:
    if key_valid is None:
        return torch.zeros(B, dtype=torch.long, device=device)
    return key_valid.to(device, torch.int8).argmax(-1)


def _expected_density(
    rows: torch.Tensor, first_qb: int, bs: int, fr: torch.Tensor, band_blocks: int, sink: int, k_tokens: int
) -> float:
    """Cells the method computes / exact causal cells, from positions alone (no scores needed)."""
    n_q = rows.shape[1]
    g = torch.arange(first_qb, first_qb + n_q, device=rows.device)[None, :, None]  # [1, NQ, 1]
    p = g * bs + torch.arange(bs, device=rows.device)  # [1, NQ, bs] absolute positions
    fr = fr[:, None, None]
    band_start = torch.maximum((g - band_blocks + 1) * bs, fr)
    band = p - band_start + 1
    sink_out = (torch.minimum(fr + sink, band_start) - fr).clamp(0, sink)
    cand = (band_start - fr - sink).clamp_min(0)
    cells = band + sink_out + cand.clamp_max(k_tokens)
    exact = p - fr + 1
    return float((cells * rows).sum()) / max(1.0, float((exact * rows).sum()))


@register(
    "hip",
    family="sparse",
    phases=("prefill",),
    params=HipParams,
    summary="HiP tree search: halve k candidate chunks, keep the top-k by a representative key, O(T log T).",
)
class Hip(Method):
    exact_params = {"density": 1.0}  # the window and the search then cover every causal key

    def budget(self, q, Tk, key_valid) -> tuple[int, int]:
        """(band blocks, mask_k tokens) for this call: the parameters, or scaled to meet `density`."""
        p = self.params
        bs = p.block_size
        n_k = -(-Tk // bs)
        if p.density is None:
            return 1 + -(-p.window // bs), p.mask_k
        if p.density >= 1:
            return n_k, Tk
        rows = real_query_rows(q, Tk, bs, key_valid)
        fr = _first_real(key_valid, q.shape[0], q.device)
        first_qb = (Tk - q.shape[2]) // bs

        def at(f: float) -> tuple[int, int, float]:
            nb = min(n_k, 1 + math.ceil(f * p.window / bs))
            kt = max(p.block_size_k, int(f * p.mask_k) // p.block_size_k * p.block_size_k)
            return nb, kt, _expected_density(rows, first_qb, bs, fr, nb, p.sink, kt)

        lo, hi = 0.0, 4.0 * Tk / max(1, min(p.mask_k, p.window or p.mask_k))
        for _ in range(40):  # the density is non-decreasing in the scale factor
            mid = 0.5 * (lo + hi)
            if at(mid)[2] <= p.density:
                lo = mid
            else:
                hi = mid
        a, b = at(lo), at(hi)
        nb, kt, _ = a if abs(a[2] - p.density) <= abs(b[2] - p.density) else b
        return nb, kt

    def plan(self, q, k, ctx) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(band [B, NQ, NK] key blocks every head attends, tokens [B, Hs, NQ, M] or None)."""
        p = self.params
        B, Tk = q.shape[0], k.shape[2]
        layout = block_layout(q.shape[2], Tk, p.block_size, ctx.key_valid, ctx.window, B, q.device)
        band_blocks, mask_k = self.budget(q, Tk, ctx.key_valid)
        has_rows = real_query_rows(q, Tk, p.block_size, ctx.key_valid).any(-1)  # [B, NQ]
        band = forced_blocks(layout, 0, band_blocks) & has_rows[..., None]
        tokens = None
        if band_blocks < layout.n_k:
            tokens = self._search(q, k, ctx, layout, band_blocks, mask_k, has_rows)
        return band, tokens

    def prefill(self, q, k, v, ctx):
        t0 = time.perf_counter()
        band, tokens = self.plan(q, k, ctx)
        B, Hkv = k.shape[:2]
        support = BlockSupport.from_mask(band[:, None].expand(B, Hkv, *band.shape[1:]), self.params.block_size)
        estimate_s = time.perf_counter() - t0
        res = block_sparse_attention(
            q, k, v, support, causal=True, window=ctx.window, scale=ctx.scale, key_valid=ctx.key_valid
        )
        if tokens is None or not bool((tokens >= 0).any()):
            return AttnOutput(res.out, res.cells, estimate_s, res.lse)
        tok = token_gather_attention(
            q, k, v, tokens, self.params.block_size, causal=True, window=ctx.window, scale=ctx.scale,
            key_valid=ctx.key_valid,
        )
        out, lse = merge(res.out, res.lse, tok.out, tok.lse)
        return AttnOutput(out, res.cells + tok.cells, estimate_s, lse)

    def _search(self, q, k, ctx, layout, band_blocks, mask_k, has_rows):
        """Token lists [B, Hs, NQ, M]: the sink tokens and the units the tree search keeps."""
        p = self.params
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        bs, b_k = p.block_size, p.block_size_k
        Hs = H if p.per_head else Hkv
        Gs = H // Hs
        n_q, first = layout.n_q, layout.first_qb
        dev = q.device
        reps, ok = lagged_queries(q.float(), Tk, bs, ctx.key_valid, p.block_stride_q)  # [B, H, NQ, S, D]
        S = reps.shape[3]
        reps = reps.view(B, Hs, Gs, n_q, S, D).transpose(2, 3).reshape(B * Hs * n_q, Gs * S, D)
        ok = ok[:, None, :, None, :].expand(B, Hs, n_q, Gs, S).reshape(B * Hs * n_q, Gs * S)

        fr = _first_real(ctx.key_valid, B, dev)[:, None]  # [B, 1]
        g = torch.arange(first, first + n_q, device=dev)[None, :]  # [1, NQ] grid index of each block
        band_start = (g - band_blocks + 1) * bs
        lo = (fr + p.sink).expand(B, n_q)
        if ctx.window is not None:  # keys no query of the block can see are not candidates
            lowest_q = torch.clamp(g * bs, min=Tk - Tq)
            lo = torch.maximum(lo, lowest_q - ctx.window + 1)
        hi = torch.maximum(band_start, lo)
        hi = torch.where(has_rows, hi, lo)  # blocks without a real query choose nothing
        kv_of_s = torch.arange(Hs, device=dev) * Hkv // Hs
        seq = (torch.arange(B, device=dev)[:, None] * Hkv + kv_of_s).view(B, Hs, 1).expand(B, Hs, n_q)
        lo_i = lo[:, None].expand(B, Hs, n_q).reshape(-1)
        hi_i = hi[:, None].expand(B, Hs, n_q).reshape(-1)
        units, _ = hierarchical_topk(
            reps, ok, k.float().reshape(B * Hkv, Tk, D), seq.reshape(-1), lo_i, hi_i,
            max(1, mask_k // b_k), b_k, p.representative,
        )
        tok = lo_i[:, None, None] + units[..., None] * b_k + torch.arange(b_k, device=dev)  # [N, K, b_k]
        tok = torch.where((units[..., None] >= 0) & (tok < hi_i[:, None, None]), tok, -1).flatten(1)
        tok = tok.view(B, Hs, n_q, -1)
        if p.sink:
            sink = fr[:, None, :, None] + torch.arange(p.sink, device=dev)  # [B, 1, 1, sink]
            in_band = sink >= band_start[:, None, :, None]  # the band's blocks already hold them
            sink = torch.where(in_band | (sink >= Tk) | ~has_rows[:, None, :, None], -1, sink)
            tok = torch.cat([sink.expand(B, Hs, n_q, p.sink), tok], dim=-1)
        return tok

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
- `causal` (False): False (the paper) scores with the query block's own queries; True with the
  previous block's (leak-free, below).
- `density`: when set, overrides `mask_k` and `window`, scaling both by one factor so the measured
  density lands near it (the sink is kept); 1.0 is exact attention.

Estimation (default, `causal=False`, as the reference's mask estimation does it:
src/hip_attn/v1_1/attention2_draft_prefetch.py, `masking_iteration_draft_cuda_dup_and_score` with
`masking_iteration_draft_cuda_initialize`): each query block scores a representative key unit of
every half against its OWN queries, rows `block_stride_q - 1, 2 * block_stride_q - 1, ...` of the
block (the reference's `idx_tdst`), the score being the max over those queries and the unit's keys;
a block's later queries therefore steer the keys its earlier queries see, and outputs are not
prefix-consistent. When prefill is chunked (Tq < Tk) a query block samples the chunk's own queries
in it (a block cut by the chunk's start whose sampled rows all precede the chunk uses its last
query), as the reference does on that chunk.

`causal=True` (leak-free): block j is scored with the queries of block j - 1 (every
`block_stride_q`-th one), which all precede block j; the first block of a call falls back to its own
first query (`_lagged.py`). The candidate range (both forms) ends where block j's local window
begins, so every scored key precedes block j and no query's keys depend on a later token.

Deviations from the reference, and why:
- The initial k chunks split the candidate range evenly without the reference's power-of-two
  alignment, and a chunk of odd size splits into halves of ceil/floor size (the reference: floor/ceil).
- The local window is block aligned (attended by the block kernel) rather than per-token, and the
  search range ends where that band begins (the reference: the block's last query - window); the
  selected units and the sink run through the token-gather kernel and merge exactly with it.
- The reference keeps the first layers dense and reuses masks across decoding steps; both are
  left to per-layer overrides (`layers=`) and decoding stays exact.

Known limit (measured on gemma3-270m, 4k passkey over a repeated filler): a key unit scores its max
over a block's 32 sampled queries, so when only the last few queries (the question) point at a
needle, the filler queries lift every unit to the needle's level and the search misses it; this is
the paper's block-max scoring and holds in both forms.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Literal

import torch

from attnsieve.kernels import BlockSupport
from attnsieve.methods._lagged import lagged_queries, own_queries
from attnsieve.methods._lagged_blocks import real_query_rows
from attnsieve.methods.base import SparseMethod
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
    causal: bool = field(
        default=False,
        metadata={"help": "False (paper): score with each query block's own queries; True: the previous block's"},
    )

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


def _score_units(q_items, key_units, base, lo, hi, units, valid, b_k, buf):
    """Max over an item's representative queries and a unit's keys of q . k: [N, U] (-inf if invalid).

    q_items [N, R, D] (every row a real query); key_units [S * Tu, b_k * D] (unit u of sequence s is
    row s * Tu + u); base = s * Tu, lo, hi [N] token range; units (absolute), valid [N, U].
    """
    N, U = units.shape
    D = q_items.shape[-1]
    tok = units[..., None] * b_k + torch.arange(b_k, device=units.device)  # [N, U, b_k]
    ok = valid[..., None] & (tok >= lo[:, None, None]) & (tok < hi[:, None, None])
    rows = (base[:, None] + torch.where(valid, units, 0)).view(-1)  # an empty half may point past the keys
    kg = buf[: rows.numel() * b_k * D].view(rows.numel(), b_k * D)
    torch.index_select(key_units, 0, rows, out=kg)  # gathered into a reused buffer
    s = torch.bmm(kg.view(N, U * b_k, D), q_items.transpose(1, 2)).amax(-1)  # [N, U * b_k] max over queries
    return s.view(N, U, b_k).masked_fill_(~ok, float("-inf")).amax(-1)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """HiP's tree search for every item at once: the k best key units of each item's range.

    An item is one query block of one support head: representative queries q_items [N, R, D] with
    q_ok [N, R], a key sequence keys[seq[i]] ([S, Tk, D]) and a token range [lo, hi). Key units are
    the b_k-token blocks [u * b_k, (u + 1) * b_k) that meet the range (tokens outside it never
    count). Returns (units [N, k_units]: absolute unit indices ascending, -1 unused;
    representatives scored, a 0-dim tensor left where the search ran). Items with at most k_units
    units keep them all and score nothing.
    """
    N, R, D = q_items.shape
    S, Tk = keys.shape[0], keys.shape[1]
    dev = q_items.device
    K = k_units
    u0 = torch.div(lo, b_k, rounding_mode="floor")
    n = torch.where(hi > lo, torch.div(hi + b_k - 1, b_k, rounding_mode="floor") - u0, 0)  # [N] units met
    slot = torch.arange(K, device=dev)
    out = torch.where(slot < n[:, None], u0[:, None] + slot, torch.full((N, K), -1, device=dev))
    # Longest ranges first: they need the most halvings, so the items still searching at any level are
    # a prefix. One read of the sorted lengths plans every level (the only host read of the search).
    order = torch.argsort(n, descending=True, stable=True)
    lengths = n[order].tolist()
    # Halvings an item needs at most: after l of them no chunk exceeds ceil(ceil(n / K) / 2^l) units.
    depth = [(-(-m // K) - 1).bit_length() for m in lengths if m > K]  # descending
    scored = torch.zeros((), dtype=torch.long, device=dev)
    if not depth:
        return out, scored
    search = order[: len(depth)]
    qs, oks = q_items[search], q_ok[search]
    first_ok = oks.to(torch.int8).argmax(-1)  # padding rows repeat a real query: a plain max ignores them
    qs = torch.where(oks[..., None], qs, qs[torch.arange(qs.shape[0], device=dev), first_ok][:, None])
    Tu = -(-Tk // b_k)
    kp = torch.nn.functional.pad(keys, (0, 0, 0, Tu * b_k - Tk)) if Tu * b_k != Tk else keys
    key_units = kp.reshape(S * Tu, b_k * D)
    base, lo_s, hi_s, u0_s = seq[search] * Tu, lo[search], hi[search], u0[search]
    ns = n[search][:, None]
    start = torch.div(ns * slot, K, rounding_mode="floor")  # [A, K] the k initial chunks (relative units)
    size = torch.div(ns * (slot + 1), K, rounding_mode="floor") - start
    step = max(1, chunk_elems // (2 * K * b_k * (R + D)))
    buf = keys.new_empty(min(search.numel(), step) * 2 * K * b_k * D)
    for level in range(depth[0]):
        # Items whose bound allows another halving; one already down to single units in the prefix keeps
        # its set (each unit's non-empty half outscores the empty one) and is not counted as scored.
        A = bisect.bisect_left(depth, -level, key=operator.neg)
        z = size[:A]
        active = (z > 1).any(-1)
        zl = torch.div(z + 1, 2, rounding_mode="floor")
        c_start = torch.stack([start[:A], start[:A] + zl], -1).flatten(1)  # [A, 2K] the halves
        c_size = torch.stack([zl, z - zl], -1).flatten(1)
        valid = c_size > 0
        rep = c_start + (torch.div(c_size, 2, rounding_mode="floor") if representative == "center" else 0)
        score = torch.empty(c_start.shape, device=dev)
        for a in range(0, A, step):
            b = min(a + step, A)
            score[a:b] = _score_units(
                qs[a:b], key_units, base[a:b], lo_s[a:b], hi_s[a:b], u0_s[a:b, None] + rep[a:b], valid[a:b], b_k, buf
            )
        scored += (valid & active[:, None]).sum()
        keep = score.topk(K, dim=-1).indices  # every chunk has a non-empty half, so >= K are valid
        start[:A] = torch.gather(c_start, 1, keep)
        size[:A] = torch.gather(c_size, 1, keep)
    out[search] = u0_s[:, None] + start.sort(-1).values
    return out, scored


def _first_real(key_valid: torch.Tensor | None, B: int, device) -> torch.Tensor:
    if key_valid is None:
        return torch.zeros(B, dtype=torch.long, device=device)
    return key_valid.to(device, torch.int8).argmax(-1)


def _expected_density(
    rows: torch.Tensor, first_qb: int, bs: int, fr: torch.Tensor, band_blocks: int, sink: int, k_tokens: int
) -> float:
    """Cells the method computes / exact causal cells, from positions alone (no scores needed).

    Host planning: rows [B, NQ, bs] and fr [B] are host tensors, and so is everything made here.
    """
    n_q = rows.shape[1]
    g = torch.arange(first_qb, first_qb + n_q)[None, :, None]  # [1, NQ, 1]
    p = g * bs + torch.arange(bs)  # [1, NQ, bs] absolute positions
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
class Hip(SparseMethod):
    selects_tokens = True  # support() adds single key tokens to its blocks
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
        # The bisection runs on the host: its inputs are positions and padding alone, so one copy of
        # the padding mask (none without padding) replaces two reads per step.
        kv = None if key_valid is None else key_valid.cpu()
        rows = real_query_rows(q.shape[2], Tk, bs, kv, q.shape[0], None)
        fr = _first_real(kv, q.shape[0], None)
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
        has_rows = real_query_rows(q.shape[2], Tk, p.block_size, ctx.key_valid, B, q.device).any(-1)  # [B, NQ]
        band = forced_blocks(layout, 0, band_blocks) & has_rows[..., None]
        tokens = None
        if band_blocks < layout.n_k:
            tokens = self._search(q, k, ctx, layout, band_blocks, mask_k, has_rows)
        return band, tokens

    def support(self, q, k, ctx):
        band, tokens = self.plan(q, k, ctx)
        B, Hkv = k.shape[:2]
        blocks = BlockSupport.from_mask(band[:, None].expand(B, Hkv, *band.shape[1:]), self.params.block_size)
        return dataclasses.replace(blocks, tokens=tokens)

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
        queries = lagged_queries if p.causal else own_queries
        reps, ok = queries(q.float(), Tk, bs, ctx.key_valid, p.block_stride_q)  # [B, H, NQ, S, D]
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
        tok = units[..., None] * b_k + torch.arange(b_k, device=dev)  # [N, K, b_k]
        inside = (units[..., None] >= 0) & (tok >= lo_i[:, None, None]) & (tok < hi_i[:, None, None])
        tok = torch.where(inside, tok, -1).flatten(1)
        tok = tok.view(B, Hs, n_q, -1)
        if p.sink:
            sink = fr[:, None, :, None] + torch.arange(p.sink, device=dev)  # [B, 1, 1, sink]
            in_band = sink >= band_start[:, None, :, None]  # the band's blocks already hold them
            sink = torch.where(in_band | (sink >= Tk) | ~has_rows[:, None, :, None], -1, sink)
            tok = torch.cat([sink.expand(B, Hs, n_q, p.sink), tok], dim=-1)
        return tok

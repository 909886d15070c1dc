"""Query-side representatives of a query block, shared by the hip and dhsa methods.

Block-selection methods summarise a query block by its queries (HiP scores keys against the
block's queries, DHSA pools them). The papers use a block's own queries (`own_queries`), which lets
a later token of the block change which keys an earlier token of the same block sees; the methods
do so by default (their look-ahead form). Their `causal=True` form uses `lagged_queries`: block j is
represented by the real queries of block j - 1 instead, all of which lie before block j starts;
a block whose previous block holds no real query (the first block of a call, or one after left
padding) falls back to its own first real query, which precedes every other query of the block.
Either way no query's key set depends on a later token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnsieve.methods.selection import grid_queries


def real_query_rows(q: torch.Tensor, Tk: int, bs: int, key_valid: torch.Tensor | None) -> torch.Tensor:
    """[B, NQ, bs] bool: grid rows holding a real (non-padding) query of this call."""
    B, Tq = q.shape[0], q.shape[2]
    first = (Tk - Tq) // bs
    n_q = -(-Tk // bs) - first
    pos = (first * bs + torch.arange(n_q * bs, device=q.device)).view(n_q, bs)  # absolute positions
    rows = (pos >= Tk - Tq) & (pos < Tk)
    rows = rows[None].expand(B, -1, -1)
    if key_valid is not None:
        kv = F.pad(key_valid.to(q.device, torch.bool), (0, (first + n_q) * bs - Tk))
        rows = rows & kv[:, first * bs :].view(B, n_q, bs)
    return rows


def _sampled_rows(q: torch.Tensor, Tk: int, bs: int, key_valid: torch.Tensor | None, stride: int):
    """(grid queries [B, H, NQ, bs, D], real rows [B, NQ, bs], sampled row offsets): rows
    `stride - 1, 2 * stride - 1, ...` of a block (its last row when stride > bs)."""
    qg, _ = grid_queries(q, Tk, bs)
    real = real_query_rows(q, Tk, bs, key_valid)
    pick = torch.arange(stride - 1, bs, stride, device=q.device)
    if pick.numel() == 0:
        pick = torch.tensor([bs - 1], device=q.device)
    return qg, real, pick


def lagged_queries(
    q: torch.Tensor, Tk: int, bs: int, key_valid: torch.Tensor | None, stride: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Representative queries of every query block, all at or before the block's first query.

    Returns (reps [B, H, NQ, S, D], ok [B, NQ, S]) with S = ceil(bs / stride): for block j the
    rows `stride - 1, 2 * stride - 1, ...` of block j - 1 that hold real queries (HiP samples
    every `stride`-th query), or, when block j - 1 holds none, block j's first real query alone.
    """
    B, H, _, D = q.shape
    qg, real, pick = _sampled_rows(q, Tk, bs, key_valid, stride)
    n_q, S = qg.shape[2], pick.numel()
    prev_q = F.pad(qg[:, :, :-1, pick], (0, 0, 0, 0, 1, 0))  # [B, H, NQ, S, D] block j holds block j - 1's rows
    prev_ok = F.pad(real[:, :-1, pick], (0, 0, 1, 0))  # [B, NQ, S]
    has_prev = prev_ok.any(-1)  # [B, NQ]

    own_row = real.to(torch.int8).argmax(-1)  # [B, NQ] first real row of the block itself
    own_q = torch.gather(qg, 3, own_row[:, None, :, None, None].expand(B, H, n_q, 1, D))  # [B, H, NQ, 1, D]
    own_q = F.pad(own_q, (0, 0, 0, S - 1))
    own_ok = torch.zeros(B, n_q, S, dtype=torch.bool, device=q.device)
    own_ok[..., 0] = real.any(-1)

    reps = torch.where(has_prev[:, None, :, None, None], prev_q, own_q)
    ok = torch.where(has_prev[..., None], prev_ok, own_ok)
    return reps, ok


def own_queries(
    q: torch.Tensor, Tk: int, bs: int, key_valid: torch.Tensor | None, stride: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Representative queries of every query block taken from the block itself (the papers' form).

    Returns (reps [B, H, NQ, S, D], ok [B, NQ, S]) with S = ceil(bs / stride): the rows
    `stride - 1, 2 * stride - 1, ...` of block j that hold real queries (HiP samples every
    `stride`-th query of its own block), or, when none of those rows is real but the block holds a
    real query (a block cut by the start of a chunk or by left padding), its last real query alone.
    Later queries of a block steer the keys its earlier queries see: not prefix-consistent.
    """
    B, H, _, D = q.shape
    qg, real, pick = _sampled_rows(q, Tk, bs, key_valid, stride)
    n_q, S = qg.shape[2], pick.numel()
    reps, ok = qg[:, :, :, pick], real[:, :, pick]  # [B, H, NQ, S, D], [B, NQ, S]
    last_row = bs - 1 - real.flip(-1).to(torch.int8).argmax(-1)  # [B, NQ] last real row of the block
    last_q = torch.gather(qg, 3, last_row[:, None, :, None, None].expand(B, H, n_q, 1, D))
    last_q = F.pad(last_q, (0, 0, 0, S - 1))  # [B, H, NQ, S, D]
    last_ok = torch.zeros(B, n_q, S, dtype=torch.bool, device=q.device)
    last_ok[..., 0] = real.any(-1)
    has = ok.any(-1)  # [B, NQ]
    reps = torch.where(has[:, None, :, None, None], reps, last_q)
    ok = torch.where(has[..., None], ok, last_ok)
    return reps, ok

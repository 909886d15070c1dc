"""Leak-free block routing helpers shared by bilevel, seer and longheads.

Methods that route a whole query block at once from pooled queries leak: a later token of the block
changes the keys an earlier token sees. These methods instead route query block j with the mean of
the queries of block j - 1 (all at positions before block j starts) and choose only among key blocks
strictly before block j, whose keys are all visible to every query of block j; the diagonal block is
always kept. This module holds that "lagged by one block" pooling and the matching candidate mask.
"""

from __future__ import annotations

import torch

from attnsieve.kernels import block_grid
from attnsieve.methods.selection import BlockLayout, grid_queries


def real_query_rows(Tq: int, Tk: int, bs: int, key_valid: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """[B, NQ, bs] bool: grid rows that hold a real (non-padding) query of this call."""
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    lead = (Tk - Tq) - first * bs
    rows = torch.zeros(n_q * bs, dtype=torch.bool, device=device)
    rows[lead : lead + Tq] = True
    rows = rows.view(1, n_q, bs).expand(batch, -1, -1)
    if key_valid is not None:
        pad = n_k * bs - Tk
        kv = torch.nn.functional.pad(key_valid.to(device, torch.bool), (0, pad)).view(batch, n_k, bs)
        rows = rows & kv[:, first:]
    return rows


def lagged_block_queries(q: torch.Tensor, Tk: int, bs: int, key_valid: torch.Tensor | None) -> torch.Tensor:
    """[B, H, NQ, D] float32: the routing query of each query block, from earlier positions only.

    Query block j is routed with the mean of the real queries of block j - 1 in this call. Where
    block j - 1 holds none (the first block of a call, or after left padding), it falls back to the
    first real query of block j itself, which precedes every other query of the block, so no query
    is ever routed with a later token.
    """
    B, H, Tq, D = q.shape
    qg, _ = grid_queries(q.float(), Tk, bs)  # [B, H, NQ, bs, D]
    real = real_query_rows(Tq, Tk, bs, key_valid, B, q.device)  # [B, NQ, bs]
    sums = (qg * real[:, None, :, :, None]).sum(3)  # [B, H, NQ, D]
    cnt = real.sum(-1)  # [B, NQ]
    prev_sum = torch.zeros_like(sums)
    prev_sum[:, :, 1:] = sums[:, :, :-1]
    prev_cnt = torch.zeros_like(cnt)
    prev_cnt[:, 1:] = cnt[:, :-1]
    first_idx = real.to(torch.int8).argmax(-1)  # [B, NQ]
    idx = first_idx[:, None, :, None, None].expand(B, H, -1, 1, D)
    first_q = torch.gather(qg, 3, idx)[:, :, :, 0]  # [B, H, NQ, D]
    lagged = prev_sum / prev_cnt.clamp_min(1)[:, None, :, None]
    return torch.where((prev_cnt > 0)[:, None, :, None], lagged, first_q)


def own_block_queries(q: torch.Tensor, Tk: int, bs: int, key_valid: torch.Tensor | None) -> torch.Tensor:
    """[B, H, NQ, D] float32: the mean of each query block's own real queries (zero where it has none).

    The papers' routing query (BiFormer's region query, SeerAttention's pooled gate query): a later
    token of the block changes the keys its earlier tokens see, so methods use it only when their
    estimate looks ahead (`causal=False`).
    """
    B, H, Tq, D = q.shape
    qg, _ = grid_queries(q.float(), Tk, bs)  # [B, H, NQ, bs, D]
    real = real_query_rows(Tq, Tk, bs, key_valid, B, q.device)  # [B, NQ, bs]
    sums = (qg * real[:, None, :, :, None]).sum(3)
    return sums / real.sum(-1).clamp_min(1)[:, None, :, None]


def before_diagonal(layout: BlockLayout) -> torch.Tensor:
    """[B, NQ, NK] bool: allowed key blocks strictly before each query block (all keys visible to it)."""
    kb = torch.arange(layout.n_k, device=layout.allowed.device)[None, None, :]
    qb = torch.arange(layout.first_qb, layout.first_qb + layout.n_q, device=kb.device)[None, :, None]
    return layout.allowed & (kb < qb)


def solve_row_density(
    density: float, n_avail: torch.Tensor, n_forced: torch.Tensor, full_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Blocks to keep per query block, [B, NQ], so the whole call lands near `density`.

    Like selection.density_budget, but rows in `full_rows` ([B, NQ] bool) are kept whole and the
    other rows share what remains of the budget: a per-row density d' is searched (bisection) so
    that the block count of all rows together is `density` of the causal total. Depends only on
    the layout (lengths, padding, window), never on scores, so it cannot leak.
    """
    n = n_avail.to(torch.float64)
    total = (n - 0.5).clamp_min(0).sum(-1)  # [B] causal cells in block units
    full = torch.zeros_like(n_avail, dtype=torch.bool) if full_rows is None else full_rows

    def keep_for(d: torch.Tensor) -> torch.Tensor:  # d: [B]
        k = torch.round(d[:, None] * (n - 0.5) + 0.5).to(torch.long)
        k = torch.minimum(torch.maximum(k, n_forced), n_avail)
        return torch.where(full, n_avail, k)

    lo = torch.zeros(n.shape[0], dtype=torch.float64, device=n.device)
    hi = torch.ones_like(lo)
    for _ in range(30):
        mid = (lo + hi) / 2
        cells = (keep_for(mid).to(torch.float64) - 0.5).clamp_min(0).sum(-1)
        over = cells > density * total
        hi = torch.where(over, mid, hi)
        lo = torch.where(over, lo, mid)
    return keep_for(hi if density >= 1 else lo)

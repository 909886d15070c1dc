"""Exact cell counts per (query block, key block) pair, for sizing static patterns to a density.

Static patterns (PowerAttention, S2-Attention's strided shards) depend only on block positions,
so the density a configuration will measure is known before any score is computed: it is the
sum, over the pairs it keeps, of the cells the exact layer computes in each pair. Counting those
cells per pair in closed form costs O(NQ * NK), never O(Tq * Tk).
"""

from __future__ import annotations

import torch

from attnsieve.kernels import block_grid


def _clamped_prefix(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """sum_{y=0}^{x} clamp(y, 0, n) for integer tensors (0 where x < 0)."""
    inner = x * (x + 1) // 2
    outer = n * (n + 1) // 2 + (x - n) * n
    return torch.where(x < 0, torch.zeros_like(x), torch.where(x <= n, inner, outer))


def _pairs_within(q_lo, q_hi, k_lo, k_hi, m: int) -> torch.Tensor:
    """Number of (q, k) with q in [q_lo, q_hi), k in [k_lo, k_hi) and q - k <= m (broadcast)."""
    n = (k_hi - k_lo).clamp_min(0)
    # For one q the count is clamp(k_hi - q + m, 0, n); sum it over consecutive q in closed form.
    b = k_hi + m - q_lo
    a = k_hi + m - q_hi + 1
    return torch.where(q_hi > q_lo, _clamped_prefix(b, n) - _clamped_prefix(a - 1, n), torch.zeros_like(n))


def pair_cells(Tq: int, Tk: int, block_size: int, window: int | None, device=None) -> torch.Tensor:
    """int64 [NQ, NK]: cells of the exact causal (optionally sliding) layer in each block pair.

    Padding is not counted (the pattern is sized once for the whole batch); the block grid is
    `block_grid`'s, so the sum over all pairs equals `exact_cells(Tq, Tk, window=window)`.
    """
    first, n_q, n_k = block_grid(Tq, Tk, block_size)
    qb = torch.arange(first, first + n_q, device=device, dtype=torch.long)[:, None]
    kb = torch.arange(n_k, device=device, dtype=torch.long)[None, :]
    q_lo = (qb * block_size).clamp_min(Tk - Tq)
    q_hi = ((qb + 1) * block_size).clamp_max(Tk)
    k_lo = kb * block_size
    k_hi = ((kb + 1) * block_size).clamp_max(Tk)
    w = Tk + 1 if window is None else window  # q - k < w; without a window every causal pair counts
    return _pairs_within(q_lo, q_hi, k_lo, k_hi, w - 1) - _pairs_within(q_lo, q_hi, k_lo, k_hi, -1)


def closest(values: torch.Tensor, target: float) -> int:
    """Index of the first entry of a 1-D tensor closest to target."""
    return int(torch.argmin((values - target).abs()))

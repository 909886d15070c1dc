"""Exact sliding-window (local) attention as a band of key blocks: O(T * window), not O(T^2).

Used for the sliding-window layers of models like Gemma-3, and by the `window` method. The band
support covers every key block that can hold a key inside a query block's window; the kernel
masks the exact window at token level, so the result equals masked dense attention.
"""

from __future__ import annotations

import torch

from attnsieve.kernels.block_sparse import (
    BlockSupport,
    SparseResult,
    block_grid,
    block_sparse_attention,
    cdiv,
)


def band_support(
    batch: int, heads: int, Tq: int, Tk: int, window: int, block_size: int, device=None
) -> BlockSupport:
    """Key blocks covering [q - window + 1, q] for every query of every query block."""
    first, n_q, _ = block_grid(Tq, Tk, block_size)
    qb = torch.arange(first, first + n_q, device=device)  # [NQ] grid index of each query block
    lowest_q = torch.clamp(qb * block_size, min=Tk - Tq)  # first real query position of the block
    lo = torch.clamp(lowest_q - window + 1, min=0) // block_size  # [NQ]
    width = min(cdiv(window - 1, block_size) + 1, int(qb[-1]) + 1) if n_q else 1
    blocks = lo[:, None] + torch.arange(width, device=device)  # [NQ, K]
    blocks = torch.where(blocks <= qb[:, None], blocks, torch.full_like(blocks, -1))
    return BlockSupport(blocks.expand(batch, heads, n_q, width), block_size)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    block_size: int = 64,
) -> SparseResult:
    """Causal attention to the `window` most recent keys (self included), computed on a band."""
    if window < 1:
        raise ValueError(f"window must be >= 1 token, got {window}")
    support = band_support(q.shape[0], k.shape[1], q.shape[2], k.shape[2], window, block_size, q.device)
    return block_sparse_attention(
        q, k, v, support, causal=True, window=window, scale=scale, key_valid=key_valid
    )

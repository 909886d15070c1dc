"""Leak-free threshold calibration shared by the threshold methods of this folder (BLASST, SALE).

A threshold calibrated on the whole input would let a later token change the threshold an earlier
query uses (a causal leak). Instead the queries are split into consecutive chunks on the block
grid; chunk c's threshold is the quantile, over a histogram of the statistic observed on the rows
of chunks 0..c-1, that keeps the fraction of work the target still needs. The first chunk has
nothing before it and runs without sparsity.
"""

from __future__ import annotations

import torch

from attnsieve.kernels import block_grid


def chunk_bounds(Tq: int, Tk: int, block_size: int, chunks: int, min_blocks: int = 4) -> list[tuple[int, int]]:
    """Consecutive query ranges [start, end) covering Tq, split on absolute block boundaries.

    About `chunks` ranges of whole blocks (the context / chunks, rounded to blocks), none shorter
    than `min_blocks` blocks unless the call itself is shorter.
    """
    first, n_q, _ = block_grid(Tq, Tk, block_size)
    per = max(min_blocks, -(-n_q // chunks))
    lead = Tk - Tq  # absolute position of query 0
    bounds, j = [], 0
    while j < n_q:
        e = min(j + per, n_q)
        start = max((first + j) * block_size - lead, 0)
        end = min((first + e) * block_size - lead, Tq)
        bounds.append((start, end))
        j = e
    return bounds


def histogram_edges(lo: float, hi: float, step: float, device=None) -> torch.Tensor:
    """Bin edges for `torch.bucketize`: bin 0 holds values <= lo, the last bin values > hi (and +inf)."""
    n = int(round((hi - lo) / step)) + 1
    return torch.linspace(lo, hi, n, dtype=torch.float64, device=device)


def keep_threshold(hist: torch.Tensor, edges: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per histogram row, the edge v such that the weight of values > v first reaches `keep` of it.

    hist: [..., len(edges) + 1] weights binned by `torch.bucketize(values, edges)`; keep: [...] in
    [0, 1]. Returns [...] float64: -inf where everything must be kept (or the histogram is empty).
    """
    total = hist.sum(-1, keepdim=True)
    tail = hist.flip(-1).cumsum(-1).flip(-1)[..., 1:]  # tail[..., i] = weight of bins above i
    need = keep[..., None].to(tail.dtype) * total
    count = (tail >= need - 1e-9 * total).sum(-1)  # tail decreases in i: indices below `count` qualify
    v = torch.where(count > 0, edges[(count - 1).clamp_min(0)], torch.full_like(total[..., 0], float("-inf")))
    return torch.where(total[..., 0] > 0, v, torch.full_like(v, float("-inf")))

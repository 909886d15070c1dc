"""Helpers that sparse methods share to turn block scores into a support.

They fix, once, which key blocks a query block may attend (causal, inside the layer's native
window, holding at least one real key), how a `density` becomes a per-row block budget with sink
and local blocks counted inside it, and how scores become a top-k support.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsieve.kernels import BlockSupport, block_grid


@dataclass
class BlockLayout:
    """Candidate key blocks of a Tq x Tk call on the block grid."""

    first_qb: int  # grid index of the first query block
    n_q: int
    n_k: int
    allowed: torch.Tensor  # [B, NQ, NK] bool: key block may hold a key the exact layer attends
    sink: torch.Tensor  # [B] grid index of the first key block holding a real key
    n_avail: torch.Tensor  # [B, NQ] number of allowed key blocks per query block


def block_layout(
    Tq: int, Tk: int, block_size: int, key_valid: torch.Tensor | None, window: int | None, batch: int, device
) -> BlockLayout:
    first, n_q, n_k = block_grid(Tq, Tk, block_size)
    qb = torch.arange(first, first + n_q, device=device)[:, None]  # [NQ, 1]
    kb = torch.arange(n_k, device=device)[None, :]  # [1, NK]
    allowed = kb <= qb
    if window is not None:
        lowest_q = torch.clamp(qb * block_size, min=Tk - Tq)
        allowed = allowed & ((kb + 1) * block_size - 1 > lowest_q - window)
    if key_valid is None:
        has_real = torch.ones(batch, n_k, dtype=torch.bool, device=device)
        sink = torch.zeros(batch, dtype=torch.long, device=device)
    else:
        pad = n_k * block_size - Tk
        kv = torch.nn.functional.pad(key_valid.to(device, torch.bool), (0, pad))
        has_real = kv.view(batch, n_k, block_size).any(-1)
        sink = torch.argmax(has_real.to(torch.int8), dim=-1)
    allowed = allowed[None] & has_real[:, None, :]  # [B, NQ, NK]
    return BlockLayout(first, n_q, n_k, allowed, sink, allowed.sum(-1))


def forced_blocks(layout: BlockLayout, sink_blocks: int, local_blocks: int) -> torch.Tensor:
    """[B, NQ, NK] bool: the first `sink_blocks` real blocks and the `local_blocks` latest ones."""
    kb = torch.arange(layout.n_k, device=layout.allowed.device)[None, None, :]
    qb = torch.arange(layout.first_qb, layout.first_qb + layout.n_q, device=kb.device)[None, :, None]
    sink = layout.sink[:, None, None]
    forced = (kb >= sink) & (kb < sink + sink_blocks)
    forced = forced | ((kb <= qb) & (kb > qb - local_blocks))
    return forced & layout.allowed


def density_budget(density: float, n_avail: torch.Tensor, n_forced: torch.Tensor) -> torch.Tensor:
    """Blocks to keep per query block so the measured density lands near `density`.

    The diagonal block is about half inside the causal triangle, so a row of n candidate blocks
    holds about n - 1/2 blocks of exact cells; keeping k = d * (n - 1/2) + 1/2 blocks computes a
    fraction d of them. Forced (sink and local) blocks count inside the budget, and are kept even
    when the budget is smaller; density 1 keeps every candidate.
    """
    k = torch.round(density * (n_avail.to(torch.float64) - 0.5) + 0.5).to(torch.long)
    return torch.minimum(torch.maximum(k, n_forced), n_avail)


def token_budget_blocks(tokens: int, block_size: int, n_avail: torch.Tensor, n_forced: torch.Tensor) -> torch.Tensor:
    """Blocks each query keeps for a fixed key-token budget per query (Quest's `token_budget`)."""
    k = torch.full_like(n_avail, max(1, -(-tokens // block_size)))
    return torch.minimum(torch.maximum(k, n_forced), n_avail)


def topk_support(
    scores: torch.Tensor, allowed: torch.Tensor, forced: torch.Tensor, keep: torch.Tensor, block_size: int
) -> BlockSupport:
    """Keep, per row, the forced blocks and then the highest-scoring allowed blocks, `keep` in all.

    scores: [B, Hs, NQ, NK]; allowed, forced: [B, NQ, NK]; keep: [B, NQ] (or [B, Hs, NQ]).
    """
    s = scores.float().masked_fill(~allowed[:, None], float("-inf"))
    s = s.masked_fill(forced[:, None], float("inf"))
    if keep.dim() == 2:
        keep = keep[:, None].expand(-1, scores.shape[1], -1)
    k_max = max(1, int(keep.max()))
    vals, idx = s.topk(min(k_max, s.shape[-1]), dim=-1)
    slot = torch.arange(idx.shape[-1], device=idx.device)
    ok = (slot < keep[..., None]) & (vals > float("-inf"))
    return BlockSupport(torch.where(ok, idx, torch.full_like(idx, -1)), block_size)


def kth_smallest(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k-th smallest of each row of x [B, N] (float32, no NaN), k: [B] in 1..N; equals `x[b].kthvalue(k[b])`.

    kthvalue takes k as a Python int, a host read per row; this radix select keeps k on the device: the floats
    map to 32-bit keys in the same (unsigned) order, and two counting passes find the k-th key 16 bits at a time.
    """
    B, dev = x.shape[0], x.device
    bits = x.view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF) ^ -(2**31)  # [B, N]: negatives reversed, then the sign bit flipped
    ones = torch.ones((), dtype=torch.long, device=dev).expand(key.shape)
    high = (key >> 16) & 0xFFFF
    cum = torch.zeros(B, 1 << 16, dtype=torch.long, device=dev).scatter_add_(1, high.long(), ones).cumsum(-1)
    d_high = (cum < k[:, None]).sum(-1)  # the high half at which the running count reaches k
    rank = k - torch.where(d_high > 0, cum.gather(1, (d_high - 1).clamp_min(0)[:, None])[:, 0], 0)
    low = torch.where(high == d_high[:, None], key & 0xFFFF, 1 << 16)  # other keys go to a spill bin
    cum = torch.zeros(B, (1 << 16) + 1, dtype=torch.long, device=dev).scatter_add_(1, low.long(), ones).cumsum(-1)
    d_low = (cum < rank[:, None]).sum(-1)
    key = (((d_high << 16) | d_low) - 2**31).to(torch.int32)  # the sign bit flipped back
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).view(torch.float32)


def grid_queries(q: torch.Tensor, Tk: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries placed on the block grid: ([B, H, NQ, bs, D], row_is_query [NQ, bs])."""
    B, H, Tq, D = q.shape
    first, n_q, _ = block_grid(Tq, Tk, block_size)
    lead = (Tk - Tq) - first * block_size
    qp = q.new_zeros(B, H, n_q * block_size, D)
    qp[:, :, lead : lead + Tq] = q
    rows = torch.zeros(n_q * block_size, dtype=torch.bool, device=q.device)
    rows[lead : lead + Tq] = True
    return qp.view(B, H, n_q, block_size, D), rows.view(n_q, block_size)

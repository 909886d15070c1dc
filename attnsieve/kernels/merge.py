"""Exact combination of partial attention results computed over disjoint key sets.

If (o1, l1) is softmax attention over key set S1 and (o2, l2) over a disjoint S2, then attention
over S1 u S2 is their lse-weighted mean. This is how sink + local windows, sparse + low-rank and
chunked prefill compose without re-implementing softmax.
"""

from __future__ import annotations

import torch


def merge(
    out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results: out [..., T, D], lse [..., T]. Empty parts (lse = -inf) drop out."""
    lse = torch.logaddexp(lse1, lse2)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w1 = torch.where(finite, torch.exp(lse1 - safe), torch.zeros_like(lse))[..., None]
    w2 = torch.where(finite, torch.exp(lse2 - safe), torch.zeros_like(lse))[..., None]
    out = out1.to(w1.dtype) * w1 + out2.to(w2.dtype) * w2
    return out.to(out1.dtype), lse


def merge_all(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge any number of partial results over pairwise disjoint key sets."""
    if not parts:
        raise ValueError("merge_all needs at least one partial result")
    out, lse = parts[0]
    for o, l in parts[1:]:
        out, lse = merge(out, lse, o, l)
    return out, lse

"""Exact attention over a whole support: its key blocks plus its single key tokens, merged.

A support (`BlockSupport`) names key blocks per query block and, optionally, key tokens outside
those blocks (MInference's vertical columns, AnchorAttention's stripes, TokenSelect's tokens, a
tree search's leaves). The block part runs on the block-sparse kernel, the token part on the
token-gather kernel, and the two partial results, over disjoint keys (`drop_covered`), merge
exactly through their log-sum-exp. Every sparse method's prefill runs through here.
"""

from __future__ import annotations

import torch

from attnsieve.kernels import compiled
from attnsieve.kernels.block_sparse import BlockSupport, SparseResult, block_sparse_attention
from attnsieve.kernels.merge import merge
from attnsieve.kernels.token_gather import drop_covered, token_gather_attention


def compact_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Move the used slots (>= 0) of each list first and drop the columns no list uses."""
    if tokens.shape[-1] == 0:
        return tokens
    srt = tokens.sort(dim=-1, descending=True).values
    width = max(1, int((srt >= 0).sum(-1).max()))
    return srt[..., :width]


def _same_heads(tokens: torch.Tensor, support: BlockSupport) -> tuple[torch.Tensor, BlockSupport]:
    """Tokens and blocks on one list of support heads (the finer of the two)."""
    Ht, Hs = tokens.shape[1], support.blocks.shape[1]
    if Ht == Hs:
        return tokens, support
    if Ht % Hs == 0:  # blocks per group, tokens per head: each head's tokens see its group's blocks
        blocks = support.blocks.repeat_interleave(Ht // Hs, dim=1)
        return tokens, BlockSupport(blocks, support.block_size)
    if Hs % Ht == 0:
        return tokens.repeat_interleave(Hs // Ht, dim=1), support
    raise ValueError(f"token heads ({Ht}) and block heads ({Hs}) must divide one another")


def _token_kernel_compiled(q: torch.Tensor) -> bool:
    """Whether token_gather_attention's "auto" backend runs the compiled kernel for these queries."""
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    return q.device.type == "cpu" and acc == torch.float32 and compiled.available()


def _runs(lengths: list[int]) -> list[tuple[int, int]]:
    """Split [0, n) into contiguous runs in which no list is more than twice the run's first (or 16) long."""
    runs, start = [], 0
    for j in range(1, len(lengths)):
        if lengths[j] > 2 * max(lengths[start], 16) or (lengths[start] == 0) != (lengths[j] == 0):
            runs.append((start, j))
            start = j
    runs.append((start, len(lengths)))
    return runs


def support_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    support: BlockSupport,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    backend: str | None = None,
) -> SparseResult:
    """Exact attention over the support's blocks plus its tokens: (out, lse, computed cells).

    Tokens inside an item's blocks, and repeated tokens, are dropped first, so every key is
    attended and counted once. `backend` goes to the block-sparse kernel.
    """
    kw = dict(causal=causal, window=window, scale=scale, key_valid=key_valid)
    res = block_sparse_attention(q, k, v, support, backend=backend, **kw)
    tokens = support.tokens
    if tokens is None or not bool((tokens >= 0).any()):
        return res
    if not causal:
        raise ValueError("token lists run in causal layers only (the token path splits the sequence causally)")
    tokens, blocks = _same_heads(tokens, support)
    tok = drop_covered(tokens, blocks)
    if not _token_kernel_compiled(q):
        # The torch token kernel (every GPU, and CPUs without the compiled kernel) orders the lists
        # by length itself and gathers per chunk only its longest list: one call for all heads and
        # query blocks, a fixed number of host syncs, none per head or per run.
        part = token_gather_attention(
            q, k, v, tok, support.block_size, causal=True, window=window, scale=scale,
            key_valid=key_valid, backend="torch",
        )
        if part.cells == 0:
            return res
        out, lse = merge(res.out, res.lse, part.out, part.lse)
        return SparseResult(out, lse, res.cells + part.cells)
    if not bool((tok >= 0).any()):
        return res
    # The compiled token kernel pads every list to the longest one. Lists differ a lot between
    # heads and usually grow along the sequence, so it runs per support head, on runs of query
    # blocks whose lengths stay within a factor of two (each run: its queries against the keys up
    # to its end).
    B, H, Tq, _ = q.shape
    Hkv, Tk, bs = k.shape[1], k.shape[2], support.block_size
    Hs = tok.shape[1]
    Gs, first, lead = H // Hs, (Tk - Tq) // bs, Tk - Tq
    out = torch.zeros_like(res.out)
    lse = torch.full_like(res.lse, float("-inf"))
    cells = res.cells
    longest = (tok >= 0).sum(-1).amax(0).tolist()  # [Hs][NQ] longest list of each head's query blocks
    for s in range(Hs):
        heads, kvh = slice(s * Gs, (s + 1) * Gs), s * Hkv // Hs
        used = longest[s]
        for ja, je in _runs(used):
            if max(used[ja:je]) == 0:
                continue
            lo, hi = max(lead, (first + ja) * bs), min(Tk, (first + je) * bs)  # positions of the run's queries
            run_tok = tok[:, s : s + 1, ja:je]
            run_tok = compact_tokens(torch.where(run_tok < hi, run_tok, -1))  # later keys are never attended
            part = token_gather_attention(
                q[:, heads, lo - lead : hi - lead], k[:, kvh : kvh + 1, :hi], v[:, kvh : kvh + 1, :hi], run_tok,
                bs, causal=True, window=window, scale=scale, key_valid=None if key_valid is None else key_valid[:, :hi],
            )
            out[:, heads, lo - lead : hi - lead] = part.out
            lse[:, heads, lo - lead : hi - lead] = part.lse
            cells += part.cells
    out, lse = merge(res.out, res.lse, out, lse)
    return SparseResult(out, lse, cells)

"""Helpers shared by the methods whose support is key blocks plus single key tokens (FlexPrefill, AnchorAttention).

A plan holds a block support (executed by the block-sparse kernel) and, per query block, a list of
key tokens outside those blocks (executed by the token-gather kernel); the two partial results
cover disjoint keys and merge exactly through their log-sum-exp. `GridCells` counts the cells a
candidate plan would compute, from per-block counts only, so methods can calibrate a threshold
against a density target without running the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsieve.kernels import BlockSupport, block_sparse_attention, drop_covered, merge, token_gather_attention
from attnsieve.methods.base import LayerContext

# Length (in tokens) the papers' default budgets are written for; defaults are scaled by Tk / this.
PAPER_CONTEXT = 131072


def compact_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Move the used slots (>= 0) of each list first and drop the columns no list uses."""
    if tokens.shape[-1] == 0:
        return tokens
    srt = tokens.sort(dim=-1, descending=True).values
    width = max(1, int((srt >= 0).sum(-1).max()))
    return srt[..., :width]


def mask_to_list(sel: torch.Tensor) -> torch.Tensor:
    """Positions of the True entries of sel [..., N] in increasing order, padded with -1: [..., max count]."""
    count = sel.sum(-1)
    width = max(1, int(count.max()) if count.numel() else 1)
    slot = torch.where(sel, sel.cumsum(-1) - 1, width)  # unselected entries go to a spill column
    pos = torch.arange(sel.shape[-1], device=sel.device).expand_as(sel)
    out = torch.full((*sel.shape[:-1], width + 1), -1, dtype=torch.long, device=sel.device)
    return out.scatter_(-1, slot, pos)[..., :width]


def run_blocks_and_tokens(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    support: BlockSupport,
    tokens: torch.Tensor | None,
    ctx: LayerContext,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Exact attention over the support's blocks plus the listed tokens: (out, lse, computed cells).

    tokens: [B, Hs, NQ, M] key positions (-1 unused) or None; tokens inside the item's blocks are
    dropped first so every key is counted and attended once.
    """
    res = block_sparse_attention(
        q, k, v, support, causal=True, window=ctx.window, scale=ctx.scale, key_valid=ctx.key_valid
    )
    if tokens is None or not bool((tokens >= 0).any()):
        return res.out, res.lse, res.cells
    tok = drop_covered(tokens, support)
    if not bool((tok >= 0).any()):
        return res.out, res.lse, res.cells
    # The kernel pads every list to the longest one. Lists differ a lot between heads and usually grow
    # along the sequence, so run it per support head, on runs of query blocks whose lengths stay within
    # a factor of two (each run is a shorter prefill call: its queries against the keys up to its end).
    B, H, Tq, _ = q.shape
    Hkv, Tk, bs = k.shape[1], k.shape[2], support.block_size
    Hs = tok.shape[1]
    Gs, first, lead = H // Hs, (Tk - Tq) // bs, Tk - Tq
    out = torch.zeros_like(res.out)
    lse = torch.full_like(res.lse, float("-inf"))
    cells = res.cells
    for s in range(Hs):
        heads, kvh = slice(s * Gs, (s + 1) * Gs), s * Hkv // Hs
        used = (tok[:, s] >= 0).sum(-1).amax(0).tolist()  # [NQ] longest list of each query block
        for ja, je in _runs(used):
            if max(used[ja:je]) == 0:
                continue
            lo, hi = max(lead, (first + ja) * bs), min(Tk, (first + je) * bs)  # positions of the run's queries
            run_tok = tok[:, s : s + 1, ja:je]
            run_tok = compact_tokens(torch.where(run_tok < hi, run_tok, -1))  # later keys are never attended
            part = token_gather_attention(
                q[:, heads, lo - lead : hi - lead], k[:, kvh : kvh + 1, :hi], v[:, kvh : kvh + 1, :hi], run_tok,
                bs, causal=True, window=ctx.window, scale=ctx.scale,
                key_valid=None if ctx.key_valid is None else ctx.key_valid[:, :hi],
            )
            out[:, heads, lo - lead : hi - lead] = part.out
            lse[:, heads, lo - lead : hi - lead] = part.lse
            cells += part.cells
    out, lse = merge(res.out, res.lse, out, lse)
    return out, lse, cells


def _runs(lengths: list[int]) -> list[tuple[int, int]]:
    """Split [0, n) into contiguous runs in which no list is more than twice the run's first (or 16) long."""
    runs, start = [], 0
    for j in range(1, len(lengths)):
        if lengths[j] > 2 * max(lengths[start], 16) or (lengths[start] == 0) != (lengths[j] == 0):
            runs.append((start, j))
            start = j
    runs.append((start, len(lengths)))
    return runs


@dataclass
class GridCells:
    """Per-block cell counts of a Tq x Tk call on the block grid (no sliding window).

    rows: [B, NQ] real query rows of each query block; keys: [B, NK] real keys of each key block;
    diag: [B, NQ] computed cells of each query block's diagonal tile; exact: [B, NQ] cells of the
    exact causal layer per query block (one head); real_key: [B, NK * bs] bool; first_qb: grid
    index of the first query block.
    """

    rows: torch.Tensor
    keys: torch.Tensor
    diag: torch.Tensor
    exact: torch.Tensor
    real_key: torch.Tensor
    first_qb: int
    block_size: int

    @classmethod
    def build(cls, Tq: int, Tk: int, block_size: int, key_valid: torch.Tensor | None, batch: int, device):
        bs = block_size
        n_k = -(-Tk // bs)
        first = (Tk - Tq) // bs
        valid = torch.zeros(batch, n_k * bs, dtype=torch.bool, device=device)
        valid[:, :Tk] = True if key_valid is None else key_valid.to(device, torch.bool)
        is_q = valid.clone()
        is_q[:, : Tk - Tq] = False
        kv_blk = valid.view(batch, n_k, bs)
        q_blk = is_q.view(batch, n_k, bs)[:, first:]
        rows = q_blk.sum(-1)
        diag = (kv_blk[:, first:].cumsum(-1) * q_blk).sum(-1)
        before = torch.nn.functional.pad(kv_blk.sum(-1).cumsum(-1), (1, 0))[:, first:-1]  # real keys in earlier blocks
        exact = rows * before + diag
        return cls(rows, kv_blk.sum(-1), diag, exact, valid, first, bs)

    def block_cells(self, mask: torch.Tensor, j0: int = 0) -> torch.Tensor:
        """Cells per [B, Hs, n] of a block mask [B, Hs, n, NK] over query blocks j0 .. j0 + n - 1."""
        n, n_k = mask.shape[2], mask.shape[3]
        qb = torch.arange(self.first_qb + j0, self.first_qb + j0 + n, device=mask.device)[:, None]
        kb = torch.arange(n_k, device=mask.device)[None, :]
        off = (mask & (kb < qb)).to(self.keys.dtype)
        cells = self.rows[:, None, j0 : j0 + n] * (off * self.keys[:, None, None, :]).sum(-1)
        return cells + self.diag[:, None, j0 : j0 + n] * (mask & (kb == qb)).to(self.keys.dtype).sum(-1)

    def token_cells(self, counts_per_block: torch.Tensor, mask: torch.Tensor, j0: int = 0) -> torch.Tensor:
        """Cells per [B, Hs, n] of listed key tokens that lie before their query block and outside its blocks.

        counts_per_block: [B, Hs, n or 1, NK] real listed tokens in each key block; mask: [B, Hs, n, NK].
        """
        uncovered = (counts_per_block * (~mask)).sum(-1)
        return self.rows[:, None, j0 : j0 + mask.shape[2]] * uncovered

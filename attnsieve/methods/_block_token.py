"""Helpers shared by the methods whose support is key blocks plus single key tokens (FlexPrefill, AnchorAttention).

A plan holds a block support and, per query block, a list of key tokens outside those blocks;
`SparseMethod` runs both (`kernels.support_attention`) and merges them exactly. `GridCells` counts the cells a
candidate plan would compute, from per-block counts only, so methods can calibrate a threshold
against a density target without running the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Length (in tokens) the papers' default budgets are written for; defaults are scaled by Tk / this.
PAPER_CONTEXT = 131072


def mask_to_list(sel: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Positions of the True entries of sel [..., N] in increasing order, padded with -1: [..., width].

    width: at least the largest count (None: that count, read on the host).
    """
    if width is None:
        count = sel.sum(-1)
        width = max(1, int(count.max()) if count.numel() else 1)
    slot = torch.where(sel, sel.cumsum(-1) - 1, width)  # unselected entries go to a spill column
    pos = torch.arange(sel.shape[-1], device=sel.device).expand_as(sel)
    out = torch.full((*sel.shape[:-1], width + 1), -1, dtype=torch.long, device=sel.device)
    return out.scatter_(-1, slot, pos)[..., :width]


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

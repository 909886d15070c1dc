"""Query-aware block selection in the manner of Quest, applied to prefill.

Each key block is summarised by its per-channel minimum and maximum (Quest's page metadata) or
its mean (a landmark); every query bounds its score against a block from the summary, each query
block takes the largest bound over its queries, and keeps the best key blocks up to its budget.
The sink block and the local (diagonal) blocks are always kept and count inside the budget.
Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024
(arXiv:2406.10774); landmark summaries after Mohtashami & Jaggi, arXiv:2305.16300.

Quest selects per token in decoding with 16-token pages; for prefill we select per query block
and use 64-token blocks by default so the CPU kernel runs large matmuls.

Hyperparameters: `token_budget` (Quest's key tokens per query, default 1024), `density` (when
set, overrides the token budget so the measured density lands near it), `block_size`, `summary`
("minmax": Quest's upper bound; "mean": dot product with the block mean), `sink_blocks`,
`local_blocks`, `per_head` (one selection per query head as Quest does, or one per KV group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from attnsieve.methods.base import SparseMethod
from attnsieve.methods.registry import register
from attnsieve.methods.selection import (
    block_layout,
    density_budget,
    forced_blocks,
    grid_queries,
    token_budget_blocks,
    topk_support,
)

# Query blocks scored per step: keeps the [rows, NK] score buffer bounded at long lengths.
SCORE_CHUNK_ROWS = 4096


@dataclass
class BlockTopKParams:
    token_budget: int = field(default=1024, metadata={"help": "key tokens per query block (Quest's budget, >= 1)"})
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides token_budget when set"}
    )
    block_size: int = field(default=64, metadata={"help": "tokens per query/key block (16..512)"})
    summary: Literal["minmax", "mean"] = field(
        default="minmax", metadata={"help": "key-block summary: minmax (Quest bound) or mean (landmark)"}
    )
    sink_blocks: int = field(default=1, metadata={"help": "first blocks always kept (>= 0)"})
    local_blocks: int = field(default=1, metadata={"help": "latest blocks always kept, diagonal included (>= 1)"})
    per_head: bool = field(default=True, metadata={"help": "select per query head (True) or per KV group (False)"})

    def __post_init__(self):
        if self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {self.token_budget}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.summary not in ("minmax", "mean"):
            raise ValueError(f"summary must be 'minmax' or 'mean', got {self.summary!r}")
        if self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be >= 0, got {self.sink_blocks}")
        if self.local_blocks < 1:
            raise ValueError(f"local_blocks must be >= 1 (the diagonal block), got {self.local_blocks}")


def key_block_summaries(
    k: torch.Tensor, key_valid: torch.Tensor | None, bs: int, n_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per key block: channel min, channel max and mean over real keys, each [B, Hkv, NK, D]."""
    B, Hkv, Tk, D = k.shape
    pad = n_k * bs - Tk
    kb = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(B, Hkv, n_k, bs, D)
    valid = torch.ones(B, Tk, dtype=torch.bool, device=k.device) if key_valid is None else key_valid
    valid = torch.nn.functional.pad(valid, (0, pad)).view(B, 1, n_k, bs, 1)
    kmin = kb.masked_fill(~valid, float("inf")).amin(3)
    kmax = kb.masked_fill(~valid, float("-inf")).amax(3)
    count = valid.sum(3).clamp_min(1)
    kmean = kb.masked_fill(~valid, 0).sum(3) / count
    empty = ~valid.any(3)  # blocks of pure padding: zero summaries (they are never candidates)
    return kmin.masked_fill(empty, 0), kmax.masked_fill(empty, 0), kmean


@register(
    "block-topk",
    family="sparse",
    phases=("prefill",),
    params=BlockTopKParams,
    summary="Quest-style query-aware block top-k (min/max key summaries), sink + local kept.",
)
class BlockTopK(SparseMethod):
    exact_params = {"density": 1.0}  # degenerate setting: equals dense attention

    def support(self, q, k, ctx):
        p = self.params
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G = H // Hkv
        bs = p.block_size
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, q.device)
        kmin, kmax, kmean = key_block_summaries(k, ctx.key_valid, bs, layout.n_k)

        qg, rows = grid_queries(q.float(), Tk, bs)  # [B, H, NQ, bs, D], [NQ, bs]
        if ctx.key_valid is not None:  # padding queries take no part in the choice
            pad = layout.n_k * bs - Tk
            real = torch.nn.functional.pad(ctx.key_valid, (0, pad)).view(B, layout.n_k, bs)
            rows = rows[None] & real[:, layout.first_qb :]
        else:
            rows = rows[None].expand(B, -1, -1)
        qg = qg.view(B, Hkv, G, layout.n_q, bs, D)
        scores = torch.empty(B, Hkv, G, layout.n_q, layout.n_k, device=q.device)
        step = max(1, SCORE_CHUNK_ROWS // (bs * G))
        for s in range(0, layout.n_q, step):
            e = min(s + step, layout.n_q)
            qc = qg[:, :, :, s:e].reshape(B, Hkv, -1, D)  # [B, Hkv, rows, D]
            if p.summary == "minmax":
                # sum_c max(q_c * min_c, q_c * max_c) = relu(q) . max + min(q, 0) . min
                bound = qc.clamp_min(0) @ kmax.transpose(-1, -2) + qc.clamp_max(0) @ kmin.transpose(-1, -2)
            else:
                bound = qc @ kmean.transpose(-1, -2)
            bound = bound.view(B, Hkv, G, e - s, bs, layout.n_k)
            bound = bound.masked_fill(~rows[:, None, None, s:e, :, None], float("-inf"))
            scores[:, :, :, s:e] = bound.amax(4)
        if p.per_head:
            scores = scores.reshape(B, H, layout.n_q, layout.n_k)
        else:
            scores = scores.amax(2)  # one list per KV group, shared by its query heads

        forced = forced_blocks(layout, p.sink_blocks, p.local_blocks)
        n_forced = forced.sum(-1)
        if p.density is not None:
            keep = density_budget(p.density, layout.n_avail, n_forced)
        else:
            keep = token_budget_blocks(p.token_budget, bs, layout.n_avail, n_forced)
        return topk_support(scores, layout.allowed, forced, keep, bs)

"""Query-aware block selection in the manner of Quest, applied to prefill.

Each key block is summarised by its per-channel minimum and maximum (Quest's page metadata) or
its mean (a landmark). Every query bounds its score against each earlier block from the summary
and keeps its own best blocks, as Quest does per decoding step; the sink block and the local
(diagonal) blocks are always kept and count inside the budget. Tang et al., "Quest: Query-Aware
Sparsity for Efficient Long-Context LLM Inference", ICML 2024 (arXiv:2406.10774); landmark
summaries after Mohtashami & Jaggi, arXiv:2305.16300.

Prefill runs the per-query choices at block granularity: a query block computes the union of its
queries' blocks (all of it counts as computed), and each query's softmax covers only its own
blocks. Selecting per query block from pooled queries would let a later token of the block change
the blocks an earlier token sees (a causal leak), so we do not. Because the union is larger than
one query's choice, a budget controller sets each query block's per-query k from the union growth
measured on the *previous* blocks only, keeping the measured density near `density` without any
output depending on a later token. Quest's 16-token pages become 64-token blocks by default so
the CPU kernel runs large matmuls.

Hyperparameters: `token_budget` (Quest's key tokens per query, default 1024), `density` (when
set, overrides the token budget so the measured density lands near it), `block_size`, `summary`
("minmax": Quest's upper bound; "mean": dot product with the block mean), `sink_blocks`,
`local_blocks`, `per_head` (one selection per query head as Quest does, or one per KV group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from attnsieve.kernels import BlockSupport
from attnsieve.methods.base import SparseMethod
from attnsieve.methods.registry import register
from attnsieve.methods.selection import (
    block_layout,
    density_budget,
    forced_blocks,
    grid_queries,
    token_budget_blocks,
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
    summary="Quest-style query-aware top-k of key blocks (min/max summaries) per query, sink + local kept.",
)
class BlockTopK(SparseMethod):
    exact_params = {"density": 1.0}  # degenerate setting: equals dense attention

    def support(self, q, k, ctx):
        p = self.params
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G = H // Hkv
        bs = p.block_size
        Hs = H if p.per_head else Hkv  # support heads: one list per query head or per KV group
        Gs = H // Hs
        R = Gs * bs  # query rows of one support item, head-major as the kernel stacks them
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, q.device)
        n_q, n_k = layout.n_q, layout.n_k
        kmin, kmax, kmean = key_block_summaries(k, ctx.key_valid, bs, n_k)

        qg, rows = grid_queries(q.float(), Tk, bs)  # [B, H, NQ, bs, D], [NQ, bs]
        if ctx.key_valid is not None:  # padding queries choose nothing
            pad = n_k * bs - Tk
            real = torch.nn.functional.pad(ctx.key_valid, (0, pad)).view(B, n_k, bs)
            rows = rows[None] & real[:, layout.first_qb :]
        else:
            rows = rows[None].expand(B, -1, -1)  # [B, NQ, bs]
        row_real = rows[:, None, :, None, :].expand(B, Hs, n_q, Gs, bs).reshape(B, Hs, n_q, R)

        forced = forced_blocks(layout, p.sink_blocks, p.local_blocks)  # [B, NQ, NK]
        n_forced = forced.sum(-1)
        if p.density is not None:
            budget = density_budget(p.density, layout.n_avail, n_forced)
        else:
            budget = token_budget_blocks(p.token_budget, bs, layout.n_avail, n_forced)

        qg = qg.view(B, Hkv, G, n_q, bs, D)
        ctrl = (torch.ones(B, Hs, device=q.device), torch.zeros(B, Hs, device=q.device))  # growth, debt
        unions, row_sets = [], []
        step = max(1, SCORE_CHUNK_ROWS // (bs * G))
        for s in range(0, n_q, step):
            e = min(s + step, n_q)
            qc = qg[:, :, :, s:e].reshape(B, Hkv, -1, D)  # [B, Hkv, G * rows, D]
            if p.summary == "minmax":
                # sum_c max(q_c * min_c, q_c * max_c) = relu(q) . max + min(q, 0) . min
                bound = qc.clamp_min(0) @ kmax.transpose(-1, -2) + qc.clamp_max(0) @ kmin.transpose(-1, -2)
            else:
                bound = qc @ kmean.transpose(-1, -2)
            # [B, Hkv, G, nqc, bs, NK] -> items [B, Hs, nqc, R, NK]
            bound = bound.view(B, Hs, Gs, e - s, bs, n_k).transpose(2, 3).reshape(B, Hs, e - s, R, n_k)
            for j in range(s, e):
                union, sel, ctrl = self._choose_block(
                    bound[:, :, j - s], layout.allowed[:, j], forced[:, j], budget[:, j], row_real[:, :, j], ctrl
                )
                unions.append(union)
                row_sets.append(sel)
        union = torch.stack(unions, dim=2)  # [B, Hs, NQ, NK]
        support = BlockSupport.from_mask(union, bs)
        slots = support.blocks  # [B, Hs, NQ, K]
        sets = torch.stack(row_sets, dim=2)  # [B, Hs, NQ, R, NK]
        gather = slots.clamp_min(0)[:, :, :, None, :].expand(-1, -1, -1, R, -1)
        row_mask = torch.gather(sets, 4, gather) & (slots >= 0)[:, :, :, None, :]
        return BlockSupport(slots, bs, row_mask)

    @staticmethod
    def _choose_block(score, allowed, forced, budget, real, ctrl):
        """One query block: every query keeps its own top-k blocks; k follows the budget controller.

        score: [B, Hs, R, NK]; allowed, forced: [B, NK]; budget: [B]; real: [B, Hs, R].
        ctrl = (growth, debt), each [B, Hs]: the union's growth over k and the blocks the union
        overspent (< 0) or saved (> 0) against the budget, both from earlier query blocks only.
        """
        growth, debt = ctrl
        n_forced = forced.sum(-1)[:, None]  # [B, 1]
        n_avail = allowed.sum(-1)[:, None]
        b = budget[:, None].float()
        k = torch.floor((b + debt).clamp_min(0) / growth).long()
        k = torch.minimum(torch.maximum(k, n_forced), n_avail)  # [B, Hs]
        s = score.masked_fill(~allowed[:, None, None], float("-inf"))
        s = s.masked_fill(forced[:, None, None], float("inf"))
        k_max = max(1, int(k.max()))
        vals, idx = s.topk(min(k_max, s.shape[-1]), dim=-1)  # [B, Hs, R, k_max]
        slot = torch.arange(idx.shape[-1], device=idx.device)
        ok = (slot < k[:, :, None, None]) & (vals > float("-inf")) & real[..., None]
        sel = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, ok)  # [B, Hs, R, NK]
        has_rows = real.any(-1)  # [B, Hs]
        union = sel.any(2) | (forced[:, None] & has_rows[..., None])  # [B, Hs, NK]
        size = union.sum(-1).float()
        free = has_rows & (b > n_forced) & (b < n_avail)  # blocks where the controller has a choice
        growth = torch.where(free & (k > n_forced), 0.5 * growth + 0.5 * (size / k.float()).clamp_min(1.0), growth)
        debt = torch.where(free, (debt + b - size).clamp_min(-b), debt)  # never owe more than one block's budget
        return union, sel, (growth, debt)

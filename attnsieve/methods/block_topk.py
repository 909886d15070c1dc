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
the blocks an earlier token sees (a causal leak), so we do not. Quest's 16-token pages become
64-token blocks by default so the CPU kernel runs large matmuls.

Budget, one meaning: `token_budget` is Quest's, key tokens *per query*: every query keeps
ceil(token_budget / block_size) key blocks of its own (its sink and local blocks included, as
Quest's budget includes its pages), or all it can see when fewer; the union a query block computes
is larger, and measured density reports it. With `density` instead, the union is what is budgeted:
a controller sets each query block's per-query k from the union growth measured on the *previous*
blocks only, keeping the measured density near `density` without any output depending on a later
token (this controller is what the compiled planner runs; the fixed per-query budget runs on the
torch planner).

Hyperparameters: `token_budget` (key tokens per query, Quest's default 1024), `density` (when set,
overrides the token budget so the measured density lands near it), `block_size`, `summary`
("minmax": Quest's upper bound; "mean": dot product with the block mean), `sink_blocks`,
`local_blocks`, `per_head` (one selection per query head as Quest does, or one per KV group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from attnsieve.kernels import BlockSupport, compiled
from attnsieve.methods.base import SparseMethod
from attnsieve.methods.registry import register
from attnsieve.methods.selection import (
    block_layout,
    density_budget,
    forced_blocks,
    grid_queries,
    token_budget_blocks,
)

# Query rows scored per step: keeps the [rows, NK] score buffer bounded at long lengths. A GPU takes
# larger steps (each step is ~10 kernel launches; 16k rows x 1024 key blocks is 64 MB per KV head).
SCORE_CHUNK_ROWS = 4096
SCORE_CHUNK_ROWS_CUDA = 16384


def block_bounds(qc: torch.Tensor, kmax: torch.Tensor, kmin: torch.Tensor | None,
                 tensor_cores: bool | None = None) -> torch.Tensor:
    """Float32 scores of query rows qc [B, Hkv, rows, D] against key-block summaries [B, Hkv, NK, D].

    minmax (kmin given): Quest's bound sum_c max(q_c min_c, q_c max_c) = relu(q) . max + min(q, 0) . min;
    mean (kmin None): q . mean. Half-precision queries on CUDA multiply in their own dtype on the
    tensor cores as one matmul over 2D channels ([relu(q), min(q, 0)] . [max, min]), accumulating and
    returning float32: the products of half-precision values are exact in float32, so only the order
    of accumulation differs from the float32 path (as on the CPU's bf16 planner). Elsewhere float32.
    `tensor_cores` forces the half-precision form (None: on CUDA for half-precision queries).
    """
    if tensor_cores is None:
        tensor_cores = qc.is_cuda and qc.dtype in (torch.float16, torch.bfloat16)
    if not tensor_cores:
        qc = qc.float()
        if kmin is None:
            return qc @ kmax.float().transpose(-1, -2)
        return qc.clamp_min(0) @ kmax.float().transpose(-1, -2) + qc.clamp_max(0) @ kmin.float().transpose(-1, -2)
    B, Hkv, rows, D = qc.shape
    if kmin is not None:
        a = torch.cat([qc.clamp_min(0), qc.clamp_max(0)], -1)  # [B, Hkv, rows, 2D]
        b = torch.cat([kmax, kmin], -1).to(qc.dtype)  # [B, Hkv, NK, 2D]: min and max are exact in k's dtype
    else:
        a, b = qc, kmax.to(qc.dtype)  # the mean rounded to the queries' dtype
    a, b = a.reshape(B * Hkv, rows, -1), b.reshape(B * Hkv, -1, b.shape[-1]).transpose(1, 2)
    try:
        out = torch.bmm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # a torch or GPU without half x half -> float32 GEMMs: float32 inputs
        out = torch.bmm(a.float(), b.float())
    return out.view(B, Hkv, rows, -1)


@dataclass
class BlockTopKParams:
    token_budget: int = field(
        default=1024, metadata={"help": "key tokens per query, as whole blocks (Quest's budget, >= 1)"}
    )
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
    k: torch.Tensor, key_valid: torch.Tensor | None, bs: int, n_k: int, mean: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per key block: channel min, channel max and mean over real keys, each [B, Hkv, NK, D].

    Min and max keep k's dtype (exact in any dtype); the mean is computed in float32, and only when
    `mean` is true (None otherwise: it reads all of k once more in float32).
    """
    B, Hkv, Tk, D = k.shape
    pad = n_k * bs - Tk
    if key_valid is None and pad == 0:  # every block full of real keys: no masking needed
        kb = k.reshape(B, Hkv, n_k, bs, D)
        return kb.amin(3), kb.amax(3), kb.float().mean(3) if mean else None
    kb = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(B, Hkv, n_k, bs, D)
    valid = torch.ones(B, Tk, dtype=torch.bool, device=k.device) if key_valid is None else key_valid
    valid = torch.nn.functional.pad(valid, (0, pad)).view(B, 1, n_k, bs, 1)
    kmin = kb.masked_fill(~valid, float("inf")).amin(3)
    kmax = kb.masked_fill(~valid, float("-inf")).amax(3)
    kmean = kb.float().masked_fill(~valid, 0).sum(3) / valid.sum(3).clamp_min(1) if mean else None
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
    # The compiled planner (kernels/csrc) makes the same choices as the torch code below, which
    # stays as its reference and as the path where the compiled kernels are unavailable.
    use_compiled = True

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

        lead = (Tk - Tq) - layout.first_qb * bs
        rows = torch.zeros(n_q * bs, dtype=torch.bool, device=q.device)
        rows[lead : lead + Tq] = True  # grid rows that hold a query
        rows = rows.view(n_q, bs)
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

        if bool((budget >= layout.n_avail).all()):  # every candidate kept: plain causal blocks, no row masks
            full = layout.allowed[:, None].expand(B, Hs, n_q, n_k)
            return BlockSupport.from_mask(full & rows.any(-1)[:, None, :, None], bs)

        per_query = p.density is None  # token_budget: a fixed k per query, no union controller
        if self.use_compiled and not per_query and q.device.type == "cpu" and compiled.available():
            # bf16 queries plan on the CPU's bf16 matrix units where present (bounds accumulate in
            # float32; only the order of accumulation differs from the float32 planner)
            pd = torch.bfloat16 if q.dtype == torch.bfloat16 and compiled.native_dtype(q.dtype, 16, D, 16) == q.dtype \
                else torch.float32
            if p.summary == "minmax" and ctx.key_valid is None and Tk == n_k * bs and k.stride(-1) == 1:
                summ = compiled.module().block_minmax(k, bs).to(pd)  # [max, min] per block in one pass
            else:
                kmin, kmax, kmean = key_block_summaries(k, ctx.key_valid, bs, n_k, mean=p.summary == "mean")
                summ = (torch.cat([kmax, kmin], -1) if p.summary == "minmax" else kmean).to(pd)
            qf = q.to(pd)  # read in place when the channels are contiguous (a model's transposed view)
            slots, row_mask = compiled.module().block_topk_plan(
                qf if qf.stride(-1) == 1 else qf.contiguous(), summ.contiguous(), rows.contiguous(),
                layout.allowed.contiguous(),
                forced.contiguous(), budget.long().contiguous(), Hs, layout.first_qb, lead, int(budget.max()),
                p.summary == "minmax",
            )
            return BlockSupport(slots.view(B, Hs, n_q, -1), bs, row_mask.view(B, Hs, n_q, R, -1))

        # Pass 1: every real query ranks the candidate blocks (forced ones first), keeping its best
        # k_cap; `first_rank` records, per query block and key block, the best rank any of the
        # block's queries gave it, so the union of the queries' top-k is {first_rank < k} for any k.
        k_cap = int(budget.max())
        kmin, kmax, kmean = key_block_summaries(k, ctx.key_valid, bs, n_k, mean=p.summary == "mean")
        # half-precision queries stay so on CUDA (block_bounds multiplies them on the tensor cores)
        plan_dt = q.dtype if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else torch.float32
        qg = grid_queries(q.to(plan_dt), Tk, bs)[0].view(B, Hkv, G, n_q, bs, D)
        ranked = torch.empty(B, Hs, n_q, R, k_cap, dtype=torch.int32, device=q.device)
        first_rank = torch.empty(B, Hs, n_q, n_k, dtype=torch.int32, device=q.device)
        slot_rank = torch.arange(k_cap, device=q.device, dtype=torch.int32)
        step = max(1, (SCORE_CHUNK_ROWS_CUDA if q.is_cuda else SCORE_CHUNK_ROWS) // (bs * G))
        for s in range(0, n_q, step):
            e = min(s + step, n_q)
            qc = qg[:, :, :, s:e].reshape(B, Hkv, -1, D)  # [B, Hkv, G * rows, D]
            bound = block_bounds(qc, kmax, kmin) if p.summary == "minmax" else block_bounds(qc, kmean, None)
            # [B, Hkv, G, nqc, bs, NK] -> items [B, Hs, nqc, R, NK]
            bound = bound.view(B, Hs, Gs, e - s, bs, n_k).transpose(2, 3).reshape(B, Hs, e - s, R, n_k)
            bound = bound.masked_fill(~layout.allowed[:, None, s:e, None], float("-inf"))
            bound = bound.masked_fill(forced[:, None, s:e, None], float("inf"))
            vals, idx = bound.topk(k_cap, dim=-1)  # [B, Hs, nqc, R, k_cap]
            ok = (vals > float("-inf")) & row_real[:, :, s:e, :, None]
            idx = torch.where(ok, idx, n_k).to(torch.int32)  # n_k: "no block"
            ranked[:, :, s:e] = idx
            best = torch.full((B, Hs, e - s, n_k + 1), k_cap, dtype=torch.int32, device=q.device)
            ranks = slot_rank.expand_as(idx).reshape(B, Hs, e - s, -1)
            best.scatter_reduce_(-1, idx.reshape(B, Hs, e - s, -1).long(), ranks, reduce="amin")
            first_rank[:, :, s:e] = best[..., :n_k]

        # Union size of every query block for every k, then the causal budget controller.
        hist = torch.zeros(B, Hs, n_q, k_cap + 1, dtype=torch.int32, device=q.device)
        hist.scatter_add_(-1, first_rank.long(), torch.ones_like(first_rank))
        union_size = hist.cumsum(-1)  # union_size[..., k - 1] = blocks whose best rank is < k
        if per_query:
            k_per = budget[:, None].expand(B, Hs, n_q).long()
        else:
            k_per = self._controller(union_size, budget, n_forced, layout.n_avail, row_real.any(-1))

        union = first_rank < k_per[..., None]  # [B, Hs, NQ, NK]
        support = BlockSupport.from_mask(union, bs)
        slots = support.blocks  # [B, Hs, NQ, K]
        # Pass 2: each query's own blocks among its item's slots.
        row_mask = torch.empty(*slots.shape[:3], R, slots.shape[-1], dtype=torch.bool, device=q.device)
        for s in range(0, n_q, step):
            e = min(s + step, n_q)
            own = slot_rank < k_per[:, :, s:e, None, None]  # [B, Hs, nqc, 1, k_cap]
            mine = torch.zeros(B, Hs, e - s, R, n_k + 1, dtype=torch.bool, device=q.device)
            mine.scatter_(-1, ranked[:, :, s:e].long(), own.expand(-1, -1, -1, R, -1))  # column n_k: "none"
            cols = slots[:, :, s:e, None, :].clamp_min(0).expand(-1, -1, -1, R, -1)
            row_mask[:, :, s:e] = torch.gather(mine, -1, cols) & (slots[:, :, s:e, None, :] >= 0)
        return BlockSupport(slots, bs, row_mask)

    @staticmethod
    def _controller(union_size, budget, n_forced, n_avail, has_rows):
        """Per query block, the per-query k whose union meets the budget, from earlier blocks only.

        union_size: [B, Hs, NQ, k_cap + 1] (entry k - 1 = union size when each query keeps k);
        budget, n_forced, n_avail: [B, NQ]; has_rows: [B, Hs, NQ]. The controller tracks the
        union's growth over k (EMA) and the blocks overspent or saved so far (debt), both measured
        on query blocks before the current one, so no query's k depends on a later token. It is a
        sequential loop over query blocks on small tensors, so on a GPU it runs on the CPU: one copy
        each way instead of ~10 tiny kernels per query block, in the compiled extension's
        `block_topk_controller` where it is built (the same float32 arithmetic; this loop is its
        reference and its fallback).
        """
        if union_size.device.type != "cpu":
            cpu = [t.cpu() for t in (union_size, budget, n_forced, n_avail, has_rows)]
            ext = compiled.module()
            if ext is not None and hasattr(ext, "block_topk_controller"):
                args = [t.contiguous() for t in (cpu[0].int(), *(t.long() for t in cpu[1:4]), cpu[4].bool())]
                return ext.block_topk_controller(*args).to(union_size.device)
            return BlockTopK._controller(*cpu).to(union_size.device)
        B, Hs, n_q, _ = union_size.shape
        growth = torch.ones(B, Hs, device=union_size.device)
        debt = torch.zeros(B, Hs, device=union_size.device)
        k_out = torch.empty(B, Hs, n_q, dtype=torch.long, device=union_size.device)
        for j in range(n_q):
            b = budget[:, j, None].float()
            nf, na = n_forced[:, j, None], n_avail[:, j, None]
            k = torch.floor((b + debt).clamp_min(0) / growth).long()
            k = torch.minimum(torch.maximum(k, nf), na).clamp_max(union_size.shape[-1] - 1)  # [B, Hs]
            k_out[:, :, j] = k
            size = torch.gather(union_size[:, :, j], -1, (k - 1).clamp_min(0)[..., None])[..., 0].float()
            free = has_rows[:, :, j] & (b > nf) & (b < na)  # blocks where the controller has a choice
            observed = (size / k.float()).clamp_min(1.0)
            growth = torch.where(free & (k > nf), 0.5 * growth + 0.5 * observed, growth)
            debt = torch.where(free, (debt + b - size).clamp_min(-b), debt)
        return k_out

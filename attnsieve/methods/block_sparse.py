"""MInference's block-sparse pattern: each query block attends its top-k key blocks by pooled scores.

Queries and keys are mean-pooled into blocks; the dot product of a pooled query block with each
earlier pooled key block ranks the key blocks, and each query block attends its `top_k` best,
executed exactly by the block kernel. Jiang et al., "MInference 1.0: Accelerating Pre-filling for
Long-Context LLMs via Dynamic Sparse Attention", NeurIPS 2024 (arXiv:2407.02490); reference
implementation microsoft/MInference (`block_sparse_attention`, top-k = 100 blocks of 64).

Hyperparameters (defaults are the reference's, unscaled): `top_k` (key blocks per query block,
100, capped at the blocks a query block can see); `causal` (False, the paper: a query block is
ranked by its own pooled queries; True: by the pooled queries of the block before it, see below);
`ref_context` (opt-in, default None: when set, `top_k` scales with Tk / ref_context, which the
reference does not do); `sink_blocks` / `local_blocks` (first real key blocks / latest key blocks,
the diagonal included, always kept inside the budget; None: 0 and 0 with the paper's top_k as in
the reference, 1 and 1 under `density` or `causal=True`); `density` (when set, overrides `top_k` so
that the measured density lands near it, via selection.density_budget); `block_size` (64, as in the
paper).

Why the sink and diagonal are kept under `density`: the reference keeps 100 blocks, so at a few
thousand tokens every early query block keeps all its blocks and a long row keeps many. A density
budget leaves early rows one or two blocks, and the pooled ranking then often drops a block's own
keys or the attention sink (on gemma3-270m at 4k, density 0.2, a pass key was lost with nothing
forced and found with either block forced). Set both to 0 for the bare reference ranking.

Estimation (default, `causal=False`, as in MInference's `_build_block_index` in
minference/ops/block_sparse_flash_attention.py): queries and keys are mean-pooled over blocks of
64 (a partial block is zero-padded, so its mean is its sum / 64); each query block scores the key
blocks at or before it (the diagonal included) by pooled q . pooled k and keeps its top_k; nothing
is forced; the kernel masks at token level. A block's own later queries steer its selection, so
outputs are not prefix-consistent. When prefill is chunked (Tq < Tk) each of the chunk's query
blocks pools the chunk's own queries in it, as the reference would on that chunk.

`causal=True` (leak-free): the key blocks of query block j are ranked with the pooled queries of
block j - 1 (all before block j's start: "lagged by one block"), over key blocks 0..j-1; the
diagonal (and `local_blocks`) and the sink block are always kept, since the lagged queries cannot
score the diagonal. A query block with no earlier queries in the call (the first one) ranks its
candidates by recency. Pooling averages only real tokens. The price: a question in the last block
does not steer its own selection.

Padding keys (left padding in a batch) never count in a pool; blocks without a real key are never
chosen.

Exact setting: `density=1.0` keeps every causal block (equals dense attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.kernels import BlockSupport
from attnsieve.methods.base import SparseMethod
from attnsieve.methods.registry import register
from attnsieve.methods.selection import block_layout, density_budget, forced_blocks, grid_queries, topk_support


@dataclass
class BlockSparseParams:
    top_k: int = field(default=100, metadata={"help": "key blocks per query block (>= 1)"})
    causal: bool = field(
        default=False,
        metadata={"help": "False (paper): rank with each block's own pooled queries; True: the previous block's"},
    )
    ref_context: int | None = field(
        default=None, metadata={"help": "opt-in: context top_k is given for, scaled by Tk/ref_context (None: unscaled)"}
    )
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides top_k when set"}
    )
    block_size: int = field(default=64, metadata={"help": "tokens per pooled query/key block (16..512)"})
    sink_blocks: int | None = field(
        default=None, metadata={"help": "first real key blocks always kept (>= 0; None: 0, or 1 when causal)"}
    )
    local_blocks: int | None = field(
        default=None,
        metadata={"help": "latest key blocks always kept, diagonal included (None: 0, or 1 when causal; causal: >= 1)"},
    )

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.ref_context is not None and self.ref_context < 1:
            raise ValueError(f"ref_context must be >= 1 token or None, got {self.ref_context}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.sink_blocks is not None and self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be >= 0 or None, got {self.sink_blocks}")
        low = 1 if self.causal else 0
        if self.local_blocks is not None and self.local_blocks < low:
            raise ValueError(
                f"local_blocks must be >= {low} or None, got {self.local_blocks}"
                + (" (causal=True cannot score the diagonal block, so it is always kept)" if self.causal else "")
            )


def pooled_blocks(x: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the real rows of each block: x [B, H, N, bs, D], real [B, N, bs] -> ([B, H, N, D], any [B, N])."""
    w = real[:, None, :, :, None].to(x.dtype)
    count = real.sum(-1)  # [B, N]
    pooled = (x * w).sum(3) / count.clamp_min(1)[:, None, :, None].to(x.dtype)
    return pooled, count > 0


@register(
    "block-sparse",
    family="sparse",
    phases=("prefill",),
    params=BlockSparseParams,
    summary="MInference block-sparse: top-k key blocks per query block from mean-pooled q/k.",
)
class BlockSparse(SparseMethod):
    exact_params = {"density": 1.0}  # degenerate setting: every causal block, equals dense

    def support(self, q, k, ctx):
        p = self.params
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G = H // Hkv
        bs = p.block_size
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, q.device)
        first, n_q, n_k = layout.first_qb, layout.n_q, layout.n_k
        default = 1 if p.causal or p.density is not None else 0
        sink_blocks = default if p.sink_blocks is None else p.sink_blocks
        local_blocks = default if p.local_blocks is None else p.local_blocks
        forced = forced_blocks(layout, sink_blocks, local_blocks)  # [B, NQ, NK]
        n_forced = forced.sum(-1)
        if p.density is not None:
            keep = density_budget(p.density, layout.n_avail, n_forced)
        else:
            k_ctx = p.top_k if p.ref_context is None else max(1, round(p.top_k * Tk / p.ref_context))
            keep = torch.minimum(torch.maximum(torch.full_like(n_forced, k_ctx), n_forced), layout.n_avail)
        if bool((keep >= layout.n_avail).all()):
            return BlockSupport.from_mask(layout.allowed[:, None].expand(B, H, n_q, n_k), bs)

        valid = torch.zeros(B, n_k * bs, dtype=torch.bool, device=q.device)
        valid[:, :Tk] = True if ctx.key_valid is None else ctx.key_valid.to(q.device, torch.bool)
        pad = n_k * bs - Tk
        kp = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(B, Hkv, n_k, bs, D)
        k_pool, _ = pooled_blocks(kp, valid.view(B, n_k, bs))  # [B, Hkv, NK, D]
        qg, rows = grid_queries(q.float(), Tk, bs)  # [B, H, NQ, bs, D], [NQ, bs]
        q_real = rows[None] & valid.view(B, n_k, bs)[:, first:]  # [B, NQ, bs]
        kb = torch.arange(n_k, device=q.device)
        qb = torch.arange(first, first + n_q, device=q.device)
        if not p.causal:
            # The reference: each block's own queries and keys, zero-padded means (sum / bs), key
            # blocks at or before the query block, diagonal included, scored without softmax.
            key_sum = (kp * valid.view(B, 1, n_k, bs, 1)).sum(3) / bs  # [B, Hkv, NK, D]
            q_sum = (qg * q_real[:, None, :, :, None]).sum(3) / bs  # [B, H, NQ, D]
            scores = (q_sum.view(B, Hkv, G * n_q, D) @ key_sum.transpose(-1, -2)).view(B, H, n_q, n_k)
            return topk_support(scores, layout.allowed, forced, keep, bs)
        q_pool, has_q = pooled_blocks(qg, q_real)  # [B, H, NQ, D], [B, NQ]

        # Query block j is ranked by the pooled queries of block j - 1 (lagged: no later token).
        lag = q_pool.new_zeros(B, H, n_q, D)
        lag[:, :, 1:] = q_pool[:, :, :-1]
        lag_ok = torch.zeros(B, n_q, dtype=torch.bool, device=q.device)
        lag_ok[:, 1:] = has_q[:, :-1]
        scores = (lag.view(B, Hkv, G * n_q, D) @ k_pool.transpose(-1, -2)).view(B, H, n_q, n_k)
        recency = kb.to(scores.dtype).expand(B, H, n_q, n_k)  # no lagged queries: nearest blocks first
        scores = torch.where(lag_ok[:, None, :, None], scores, recency)
        # The lagged queries see key blocks before block j only; block j itself is a forced local block.
        scores = scores.masked_fill((kb[None, :] >= qb[:, None])[None, None], float("-inf"))
        return topk_support(scores, layout.allowed, forced, keep, bs)

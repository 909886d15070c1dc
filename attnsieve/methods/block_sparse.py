"""MInference's block-sparse pattern: each query block attends its top-k key blocks by pooled scores.

Queries and keys are mean-pooled into blocks; the dot product of a pooled query block with each
earlier pooled key block ranks the key blocks, and each query block attends its `top_k` best,
executed exactly by the block kernel. Jiang et al., "MInference 1.0: Accelerating Pre-filling for
Long-Context LLMs via Dynamic Sparse Attention", NeurIPS 2024 (arXiv:2407.02490); reference
implementation microsoft/MInference (`block_sparse_attention`, top-k = 100 blocks of 64).

Hyperparameters: `top_k` (key blocks per query block, paper default 100 at `ref_context` = 131072
tokens, scaled linearly to the layer's context), `ref_context`, `sink_blocks` (first real key
blocks always kept, 1) and `local_blocks` (latest key blocks always kept, the diagonal included,
1), both counted inside the budget; `density` (when set, overrides `top_k` so that the measured
density lands near it, via selection.density_budget); `block_size` (64, as in the paper).

Deviations from the paper, and why:
- No causal leak: MInference scores key blocks with the mean of the query block's own queries, so
  a later token of a block changes which keys an earlier token of the block sees. Here the key
  blocks of query block j are ranked with the pooled queries of block j - 1 (all before block j's
  start: "lagged by one block"), over key blocks 0..j-1; the diagonal (and `local_blocks`) and the
  sink block are always kept. A query block with no earlier queries in the call (the first one)
  ranks its candidates by recency. Every key block is then computed exactly for the query block's
  queries, causally at token level. The price: a question in the last block does not steer its own
  selection (on a 4k pass-key prompt the needle block is missed at density 0.2).
- The sink and diagonal are forced (MInference keeps them only when they score in the top k);
  with the lag the diagonal cannot be scored, and attention sinks matter for every query.
- Pooling averages only real (non-padding) tokens.

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
    top_k: int = field(default=100, metadata={"help": "key blocks per query block at ref_context (>= 1)"})
    ref_context: int = field(
        default=131072, metadata={"help": "context (tokens) top_k is given for; it scales with Tk / ref_context"}
    )
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides top_k when set"}
    )
    block_size: int = field(default=64, metadata={"help": "tokens per pooled query/key block (16..512)"})
    sink_blocks: int = field(default=1, metadata={"help": "first real key blocks always kept (>= 0)"})
    local_blocks: int = field(default=1, metadata={"help": "latest key blocks always kept, diagonal included (>= 1)"})

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.ref_context < 1:
            raise ValueError(f"ref_context must be >= 1 token, got {self.ref_context}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be >= 0, got {self.sink_blocks}")
        if self.local_blocks < 1:
            raise ValueError(f"local_blocks must be >= 1 (the diagonal block), got {self.local_blocks}")


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
    summary="MInference block-sparse: top-k key blocks per query block from mean-pooled q/k (lagged one block).",
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
        forced = forced_blocks(layout, p.sink_blocks, p.local_blocks)  # [B, NQ, NK]
        n_forced = forced.sum(-1)
        if p.density is not None:
            keep = density_budget(p.density, layout.n_avail, n_forced)
        else:
            k_ctx = max(1, round(p.top_k * Tk / p.ref_context))
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
        q_pool, has_q = pooled_blocks(qg, q_real)  # [B, H, NQ, D], [B, NQ]

        # Query block j is ranked by the pooled queries of block j - 1 (lagged: no later token).
        lag = q_pool.new_zeros(B, H, n_q, D)
        lag[:, :, 1:] = q_pool[:, :, :-1]
        lag_ok = torch.zeros(B, n_q, dtype=torch.bool, device=q.device)
        lag_ok[:, 1:] = has_q[:, :-1]
        scores = (lag.view(B, Hkv, G * n_q, D) @ k_pool.transpose(-1, -2)).view(B, H, n_q, n_k)
        kb = torch.arange(n_k, device=q.device)
        qb = torch.arange(first, first + n_q, device=q.device)
        recency = kb.to(scores.dtype).expand(B, H, n_q, n_k)  # no lagged queries: nearest blocks first
        scores = torch.where(lag_ok[:, None, :, None], scores, recency)
        # The lagged queries see key blocks before block j only; block j itself is a forced local block.
        scores = scores.masked_fill((kb[None, :] >= qb[:, None])[None, None], float("-inf"))
        return topk_support(scores, layout.allowed, forced, keep, bs)

"""SeerAttention's block gate in its training-free form: pooled queries score pooled key blocks.

Queries are average-pooled per block and keys max-, min- and average-pooled; the gate scores every
causal key block, takes a block-causal softmax per query block, and keeps the blocks whose gate
probability exceeds a threshold (or a top-k per row), which the block-sparse kernel then executes.
Gao, Zeng, Du, Cao, So, Cao, Yang, Yang, "SeerAttention: Learning Intrinsic Sparse Attention in
Your LLMs", arXiv:2410.13276 (2024); reference implementation microsoft/SeerAttention.

The paper TRAINS its gate (AttnGate): a per-head linear projection of [q_avg] and of the
concatenated [k_max, k_min, k_avg] to 128 dims, RoPE re-applied at block positions, distilled
from the block-max-pooled attention map. This is the untrained form of that gate: with no learned
projection, the concatenated features are scored directly, q_avg . [k_max, k_min, k_avg] summed
(the dot product of [q, q, q] with the concatenation), scaled by the layer's softmax scale / 3 so
that a block of identical keys gets the logit its token would get (the learned projection would
have set this temperature). Expect it to pick worse blocks than the trained gate.

Hyperparameters:
- `threshold`: keep key blocks whose gate probability exceeds it (paper's `seerattn_threshold`,
  documented default 2e-3, the value of its LongBench runs; RULER runs used 5e-4). Not scaled with
  length: the reference uses one threshold at every length.
- `density`: target measured density in (0, 1]; when set, replaces the threshold by a per-row top-k
  (the paper's `nz_ratio` mode) sized by the layout so the measured density lands near it.
- `block_size`: gate and kernel block (paper: 64).
- `last_block_dense`: the last two query blocks attend every causal key block (paper default True;
  "usually the question of the prompt"); with `density` set they count inside the budget.
- `sink_blocks`: first key blocks always kept, counted inside the budget (default 1; see deviations).
- `causal`: False (the paper, default): query block j is gated with the mean of its own queries
  against key blocks 0..j, the diagonal block j scored like the others; True: the leak-free gate
  (below).

The gate (default, `causal=False`), as microsoft/SeerAttention does it in prefill
(seer_attn/prefill_sparse/attn_gate.py `AttnGate.forward`, the block mask of
`_seerattn_update_causal_mask` in seer_attn/prefill_sparse/llama/modeling_llama_seerattn.py, and
`get_sparse_attn_mask_from_threshold` in seer_attn/modules/common.py): q average-pooled over each
block of `block_size` queries, k max-, min- and average-pooled over each key block (a partial last
block pools the tokens it has, as the reference's ceil-mode pooling does); a softmax per query block
over key blocks 0..j (upper triangle masked, diagonal included); keep probabilities above the
threshold; the last two query-block rows dense; the lower triangle. Nothing else is forced in the
reference (`sink_blocks` below is ours); the kernel masks causally inside the diagonal block. A
later query of a block steers the blocks its earlier queries see, so outputs are not prefix-
consistent. When prefill is chunked (Tq < Tk) each query block pools the chunk's own queries in it
(the keys of the cached prefix are pooled like the others).

Deviations from the paper, and why:
- `causal=True` (leak-free gate): query block j uses the gate row of block j - 1, the mean of block
  j - 1's queries (the first block of a call falls back to its first query) against key blocks
  0..j-1 (whose keys are all visible to block j), softmax over those, and keeps the diagonal block j
  always, since the lagged queries cannot score it. No query's blocks depend on a later token: for
  prefix caching and teacher-forced scoring. The price: a question in a block does not steer its
  own block's selection.
- Attention sink: the trained gate learns to keep the first block, where a pretrained LLM parks much
  of its attention; the untrained gate often scores it low (on gemma3-270m at 4k some rows then
  covered a third of their exact attention mass), so `sink_blocks=1` keeps it (0: the bare gate).
- The gate reads the post-RoPE q and k the method receives (the paper pools pre-RoPE states and
  re-applies RoPE at block positions); pooled post-RoPE keys keep their relative-position phase.
- Pooling averages real tokens only (the reference pools the padding tokens of a partially padded
  block; blocks of pure padding are masked in both).
- `nz_ratio` maps to k = 1 - sqrt(1 - nz) of all blocks per row in the paper; here `density` sizes a
  per-row top-k with the project's measured-density definition (selection.density_budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.kernels import BlockSupport
from attnsieve.methods._lagged_blocks import (
    before_diagonal,
    lagged_block_queries,
    own_block_queries,
    solve_row_density,
)
from attnsieve.methods.base import SparseMethod
from attnsieve.methods.block_topk import key_block_summaries
from attnsieve.methods.registry import register
from attnsieve.methods.selection import block_layout, forced_blocks, topk_support

DENSE_LAST_ROWS = 2  # SeerAttention's `seerattn_last_block_dense`: the last two query-block rows


@dataclass
class SeerParams:
    threshold: float = field(
        default=2e-3, metadata={"help": "keep key blocks whose gate probability exceeds it, in [0, 1)"}
    )
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; per-row top-k replaces the threshold"}
    )
    block_size: int = field(default=64, metadata={"help": "gate and kernel block size (16..512)"})
    last_block_dense: bool = field(
        default=True, metadata={"help": "the last two query blocks attend every causal key block"}
    )
    sink_blocks: int = field(default=1, metadata={"help": "first key blocks always kept (>= 0; see docstring)"})
    causal: bool = field(
        default=False,
        metadata={"help": "False (paper): gate each block with its own pooled queries, diagonal scored; "
                          "True: the previous block's, diagonal kept"},
    )

    def __post_init__(self):
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be >= 0, got {self.sink_blocks}")


def gate_probabilities(q_pool: torch.Tensor, k_feat: torch.Tensor, cand: torch.Tensor, scale: float) -> torch.Tensor:
    """Block-causal softmax of the untrained gate.

    q_pool [B, H, NQ, D]; k_feat [B, Hkv, NK, D] (k_max + k_min + k_avg); cand [B, NQ, NK] bool.
    Returns [B, H, NQ, NK] probabilities, 0 off the candidates (rows without candidates are all 0).
    """
    B, H, n_q, D = q_pool.shape
    Hkv, n_k = k_feat.shape[1], k_feat.shape[2]
    logits = q_pool.view(B, Hkv, H // Hkv, n_q, D) @ k_feat[:, :, None].transpose(-1, -2)
    logits = (logits.reshape(B, H, n_q, n_k) * (scale / 3)).masked_fill(~cand[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


@register(
    "seer",
    family="sparse",
    phases=("prefill",),
    params=SeerParams,
    summary="SeerAttention's block gate untrained: Q avg-pool vs K max/min/avg-pool, block softmax, threshold.",
)
class Seer(SparseMethod):
    exact_params = {"density": 1.0}  # every causal block kept: equals dense attention

    def support(self, q, k, ctx):
        p = self.params
        B, H, Tq, _ = q.shape
        Tk = k.shape[2]
        bs = p.block_size
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, q.device)
        kmin, kmax, kmean = key_block_summaries(k, ctx.key_valid, bs, layout.n_k)
        if p.causal:
            q_pool = lagged_block_queries(q, Tk, bs, ctx.key_valid)  # [B, H, NQ, D], block j - 1's mean
            cand = before_diagonal(layout)  # key blocks 0..j-1 (the gate row of block j - 1)
            forced = forced_blocks(layout, p.sink_blocks, 1)  # sinks and the diagonal block
        else:
            q_pool = own_block_queries(q, Tk, bs, ctx.key_valid)  # [B, H, NQ, D], block j's own mean
            cand = layout.allowed  # key blocks 0..j, the diagonal gated like the others
            forced = forced_blocks(layout, p.sink_blocks, 0)  # sinks only
        probs = gate_probabilities(q_pool, kmax + kmin + kmean, cand, ctx.scale)
        full_rows = torch.zeros(B, layout.n_q, dtype=torch.bool, device=q.device)
        if p.last_block_dense:
            full_rows[:, -DENSE_LAST_ROWS:] = True
        if p.density is not None:
            keep = solve_row_density(p.density, layout.n_avail, forced.sum(-1), full_rows)
            forced = forced | (full_rows[:, :, None] & layout.allowed)
            return topk_support(probs, layout.allowed, forced, keep, bs)
        chosen = (probs > p.threshold) & cand[:, None]
        chosen = chosen | forced[:, None] | (full_rows[:, None, :, None] & layout.allowed[:, None])
        return BlockSupport.from_mask(chosen, bs)

"""BiFormer's bi-level routing attention, applied causally to the tokens of a language model.

The sequence is cut into regions (key blocks); region-level queries and keys are the means of the
region's queries and keys, their affinity Q_r K_r^T routes every query region to its top-k key
regions, and token-to-token attention then runs inside the routed regions (plus the query's own,
diagonal region). Zhu, Wang, Ke, Li, Lau, "BiFormer: Vision Transformer with Bi-Level Routing
Attention", CVPR 2023 (arXiv:2303.08125).

Hyperparameters:
- `topk`: key regions routed per query region (with `causal=True` the diagonal region is added on top;
  None: `topk_ratio` of each query region's causal candidates, rounded up).
- `topk_ratio`: used when `topk` is None. BiFormer fixes the number of regions (S x S = 7 x 7 = 49
  per image) and routes topk = 4 of them in its second stage, so each query sees a fixed fraction
  4/49 of the image whatever its size; a text sequence has as many regions as blocks, so the
  faithful scaling is the fraction, applied to the causal candidates of each query region.
- `density`: target measured density in (0, 1]; overrides topk so the computed cells land near it
  (diagonal and sink regions count inside it, selection.density_budget).
- `block_size`: tokens per region (16..512).
- `per_head`: BiFormer computes one routing from all channels of all heads and shares it across
  heads (False, the default: affinities summed over heads, one list for every head); True routes
  each query head separately.
- `sink_blocks`: first regions always kept, counted inside the budget (default 1; see deviations).
- `causal`: False (the paper, default): a query region is routed with the mean of its own queries
  over the key regions at or before it, its own (diagonal) region scored like the others; the
  token-level causal mask applies inside the routed regions, and a later token of a region can
  change the regions its earlier tokens see. When prefill is chunked (Tq < Tk) the chunk's own
  queries form the region queries. True: leak-free routing (below).

Deviations from the paper, and why:
- `causal=True` (leak-free routing): query region j is routed with the mean of the queries of region
  j - 1 (positions before region j; the first region of a call falls back to its first query) and
  chooses only among key regions strictly before j, so no query's keys depend on a later token; the
  diagonal region is always attended (causally masked) and comes on top of `topk`, which BiFormer
  gets from routing since a region's own affinity is high.
- Attention sink: BiFormer routes every region by affinity alone. A pretrained LLM parks much of its
  attention on its first tokens (StreamingLLM, arXiv:2309.17453), whose region mean rarely wins the
  affinity ranking; without it, on gemma3-270m at 4k, routed rows covered about a third of their exact
  attention mass instead of three quarters. `sink_blocks=1` keeps the first region (0 restores BiFormer).
- Region key means use only real (non-padding) keys; regions of pure padding are never routed.
- BiFormer's local context enhancement (a depth-wise convolution on V) is a learned module of the
  vision model and has no counterpart in a pretrained LLM; it is not applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.methods._lagged_blocks import lagged_block_queries, own_block_queries
from attnsieve.methods.base import SparseMethod
from attnsieve.methods.block_topk import key_block_summaries
from attnsieve.methods.registry import register
from attnsieve.methods.selection import block_layout, density_budget, forced_blocks, topk_support


@dataclass
class BiLevelParams:
    topk: int | None = field(
        default=None, metadata={"help": "key regions routed per query region (causal: + diagonal; None: topk_ratio)"}
    )
    topk_ratio: float = field(
        default=4 / 49, metadata={"help": "fraction of causal candidate regions routed when topk is None (0, 1]"}
    )
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides topk when set"}
    )
    block_size: int = field(default=64, metadata={"help": "tokens per region (16..512)"})
    per_head: bool = field(
        default=False, metadata={"help": "route each query head (True) or share one routing across heads (False)"}
    )
    sink_blocks: int = field(default=1, metadata={"help": "first regions always kept (>= 0; BiFormer has none)"})
    causal: bool = field(
        default=False,
        metadata={"help": "False (paper): route with each region's own queries; True: the previous region's"},
    )

    def __post_init__(self):
        if self.topk is not None and self.topk < 0:
            raise ValueError(f"topk must be >= 0 regions or None, got {self.topk}")
        if not 0 < self.topk_ratio <= 1:
            raise ValueError(f"topk_ratio must be in (0, 1], got {self.topk_ratio}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be >= 0, got {self.sink_blocks}")


def region_affinity(q_r: torch.Tensor, k_r: torch.Tensor, per_head: bool) -> torch.Tensor:
    """Q_r K_r^T: q_r [B, H, NQ, D], k_r [B, Hkv, NK, D] -> [B, Hs, NQ, NK] (Hs = H or Hkv)."""
    B, H, n_q, D = q_r.shape
    Hkv, n_k = k_r.shape[1], k_r.shape[2]
    aff = q_r.view(B, Hkv, H // Hkv, n_q, D) @ k_r[:, :, None].transpose(-1, -2)  # [B, Hkv, G, NQ, NK]
    if per_head:
        return aff.reshape(B, H, n_q, n_k)
    # one routing for all heads: the affinity of the channel-concatenated region features
    return aff.sum((1, 2))[:, None].expand(B, Hkv, n_q, n_k)


@register(
    "bilevel",
    family="sparse",
    phases=("prefill",),
    params=BiLevelParams,
    summary="BiFormer bi-level routing: mean-pooled region affinity routes each query block to its top-k key blocks.",
)
class BiLevel(SparseMethod):
    exact_params = {"density": 1.0}  # every candidate region kept: equals dense attention

    def support(self, q, k, ctx):
        p = self.params
        B, H, Tq, _ = q.shape
        Tk = k.shape[2]
        bs = p.block_size
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, q.device)
        _, _, k_r = key_block_summaries(k, ctx.key_valid, bs, layout.n_k)  # region keys: means
        if p.causal:
            q_r = lagged_block_queries(q, Tk, bs, ctx.key_valid)  # region queries, lagged by one block
            forced = forced_blocks(layout, p.sink_blocks, 1)  # sinks and the diagonal region
        else:
            q_r = own_block_queries(q, Tk, bs, ctx.key_valid)  # each region's own queries, as BiFormer
            forced = forced_blocks(layout, p.sink_blocks, 0)  # sinks only: the own region is routed
        aff = region_affinity(q_r, k_r, p.per_head)
        n_forced = forced.sum(-1)
        if p.density is not None and not p.causal:
            # the diagonal is routed like any region, so each kept region counts whole
            want = torch.floor(p.density * (layout.n_avail.to(torch.float64) - 0.5) + 0.5).to(torch.long)
            keep = torch.minimum(torch.maximum(want, n_forced.clamp_min(1)), layout.n_avail)
        elif p.density is not None:
            keep = density_budget(p.density, layout.n_avail, n_forced)
        else:
            n_cand = layout.n_avail - n_forced
            if p.topk is not None:
                routed = torch.full_like(n_cand, p.topk)
            else:
                routed = torch.ceil(n_cand.to(torch.float64) * p.topk_ratio - 1e-9).to(torch.long)
            keep = torch.minimum(n_forced + routed, layout.n_avail)
        return topk_support(aff, layout.allowed, forced, keep, bs)


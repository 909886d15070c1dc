"""Scatterbrain: an exact sparse support plus a FAVOR+ low-rank estimate of everything outside it.

The unnormalised attention matrix is exp(q . k * scale) on the support of an inner sparse method
and phi(q) . phi(k) (FAVOR+ features) off it; each row is normalised over both. Off-support sums
are the causal feature sums over all keys minus the feature products on the support, computed on
the same gathered key blocks as the exact part. Chen et al., "Scatterbrain: Unifying Sparse and
Low-rank Attention Approximation", NeurIPS 2021 (arXiv:2110.15343); HazyResearch/fly.

Hyperparameters: `inner` (a registered sparse method choosing the support, default "block-topk"),
`inner_params` (its parameters, a dict), `density` and `block_size` (passed to the inner method;
`density` sets the measured density of the exact part), `nb_features` (FAVOR+ features, None:
round(d ln d)), `seed` (projection drawn from seed and layer index), `hyperbolic` (fly's default
[exp(Wx), exp(-Wx)] features; False: the plain positive features).

Deviations, and why:
- The paper pairs the low-rank part with local (banded) or LSH sparsity; here any registered
  sparse method supplies the support. Each query block's own (diagonal) key block is always in the
  support (added if the inner method left it out): the low-rank part then needs only the state of
  earlier chunks (chunk = block size, on the same grid) and no products of its own.
- Rows whose every visible key lies in the support have nothing off it: their low-rank part is set
  to zero exactly instead of "all minus support", which would only add rounding (this is what
  makes density 1 equal dense attention to float tolerance).
- Where rounding or estimate noise makes the support's feature mass exceed the all-keys feature
  mass, the off-support part is taken as empty (the reference clamps the normaliser at 1e-24).
- Feature shifts are per key (see performer.py), so no later key rescales an earlier one.
- Causality: the low-rank sums are causal prefix sums, so scatterbrain is exactly as causal as its
  inner method's support: leak-free with the default block-topk, looking ahead where the inner
  method's default does (vertical-slash, block-sparse, seer, ...; pass
  `inner_params={"causal": True}` for their leak-free form).
Measured density = the exact part's cells (the support, diagonal blocks included); on sliding
layers the feature products computed one by one on the window edge are added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from attnsieve.kernels import BlockSupport, block_grid, block_sparse_attention, merge
from attnsieve.kernels.linear_attention import causal_feature_attention
from attnsieve.kernels.sparse_lowrank import subtract, support_feature_attention
from attnsieve.methods.base import AttnOutput, Method, SparseMethod, estimate_clock
from attnsieve.methods.performer import at_least_fp32, favor_qk
from attnsieve.methods.registry import has_param, make, method_class, names, register
from attnsieve.methods.selection import block_layout


@dataclass
class ScatterbrainParams:
    inner: str = field(default="block-topk", metadata={"help": "registered sparse method giving the exact support"})
    inner_params: dict[str, Any] | None = field(
        default=None, metadata={"help": "parameters of the inner method (a dict; density/block_size go separately)"}
    )
    density: float | None = field(
        default=None, metadata={"help": "target measured density of the exact part in (0, 1], passed to inner"}
    )
    block_size: int = field(default=64, metadata={"help": "block size of the support and low-rank chunks (16..512)"})
    nb_features: int | None = field(
        default=None, metadata={"help": "FAVOR+ features (>= 2; None: round(d ln d) for head dim d)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random projection (combined with the layer index)"})
    hyperbolic: bool = field(default=True, metadata={"help": "features exp(+-Wx - |x|^2/2) (fly's default)"})

    def __post_init__(self):
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.nb_features is not None and self.nb_features < 2:
            raise ValueError(f"nb_features must be >= 2, got {self.nb_features}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        def blocks_only(n):
            cls = method_class(n)
            return issubclass(cls, SparseMethod) and not cls.selects_tokens

        if self.inner not in names() or not blocks_only(self.inner):
            sparse = [n for n in names() if blocks_only(n)]
            raise ValueError(
                f"inner must be a registered sparse method whose support is key blocks only ({', '.join(sparse)}), "
                f"got {self.inner!r}"
            )
        if self.inner_params is not None and not isinstance(self.inner_params, dict):
            raise ValueError(f"inner_params must be a dict of the inner method's parameters, got {self.inner_params!r}")
        for key in ("density", "block_size"):
            if key in (self.inner_params or {}):
                raise ValueError(f"inner_params must not set {key!r}; set scatterbrain's own {key}")
        if self.density is not None and not has_param(self.inner, "density"):
            raise ValueError(f"inner method {self.inner!r} has no density parameter; leave density unset")
        self.inner_method()  # validates the inner parameters now

    def inner_method(self) -> SparseMethod:
        params = dict(self.inner_params or {})
        if self.density is not None:
            params["density"] = self.density
        if has_param(self.inner, "block_size"):
            params["block_size"] = self.block_size
        return make(self.inner, **params)


def with_diagonal(support: BlockSupport, Tq: int, Tk: int) -> BlockSupport:
    """The support with each query block's own key block added where it is missing (every row)."""
    first, n_q, _ = block_grid(Tq, Tk, support.block_size)
    diag = torch.arange(first, first + n_q, device=support.blocks.device)[None, None, :, None]
    blocks, row_mask = support.blocks, support.row_mask
    has = (blocks == diag).any(-1, keepdim=True)  # [B, Hs, NQ, 1]
    if not bool(has.all()):
        blocks = torch.cat([blocks, torch.where(has, -1, diag.expand_as(has))], dim=-1)
        if row_mask is not None:
            row_mask = torch.cat([row_mask, row_mask.new_ones(*row_mask.shape[:-1], 1)], dim=-1)
    if row_mask is not None:
        row_mask = row_mask | (blocks == diag)[:, :, :, None, :]
    return BlockSupport(blocks, support.block_size, row_mask)


def earlier_chunk_keys(Tq: int, Tk: int, bs: int, window: int | None, key_valid, batch: int, device) -> torch.Tensor:
    """[B, Tq] real keys each query sees in blocks before its own (causal, inside the window)."""
    valid = torch.ones(batch, Tk, dtype=torch.long, device=device) if key_valid is None else key_valid.long()
    csum = torch.nn.functional.pad(valid.cumsum(-1), (1, 0))  # csum[:, j] = real keys in [0, j)
    pos = torch.arange(Tk - Tq, Tk, device=device)
    hi = (pos // bs) * bs
    lo = torch.zeros_like(pos) if window is None else (pos - window + 1).clamp_min(0)
    lo = torch.minimum(lo, hi)
    return csum[:, hi] - csum[:, lo]


@register(
    "scatterbrain",
    family="hybrid",
    phases=("prefill",),
    params=ScatterbrainParams,
    summary="Scatterbrain: an inner sparse support computed exactly + FAVOR+ estimate off the support.",
)
class Scatterbrain(Method):
    exact_params = {"density": 1.0}  # support = every causal block: nothing off it, equals dense

    def __init__(self, params=None):
        super().__init__(params)
        self.inner = self.params.inner_method()

    def prefill(self, q, k, v, ctx):
        p = self.params
        B, H, Tq, _ = q.shape
        Tk = k.shape[2]
        t0 = estimate_clock(q)
        inner = self.inner.support(q, k, ctx)
        if inner.tokens is not None:  # the sparse + low-rank kernel covers blocks only
            raise ValueError(f"scatterbrain's inner method {self.inner.name!r} selected single tokens")
        support = with_diagonal(inner, Tq, Tk)
        estimate_s = estimate_clock(q) - t0
        bs = support.block_size
        exact = block_sparse_attention(
            q, k, v, support, causal=True, window=ctx.window, scale=ctx.scale, key_valid=ctx.key_valid
        )
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, q.device)
        everything = layout.allowed[:, None].expand(B, support.blocks.shape[1], -1, -1)
        if support.row_mask is None and bool((support.to_mask(layout.n_k) == everything).all()):
            return AttnOutput(exact.out, exact.cells, estimate_s, exact.lse)  # nothing off the support

        fq, lq, fk, lk = favor_qk(
            at_least_fp32(q), at_least_fp32(k), ctx.scale, p.nb_features, p.seed, ctx.layer_idx, p.hyperbolic
        )
        # all keys of earlier blocks (the own block is always in the support), minus the support's part
        low = causal_feature_attention(
            fq, lq, fk, lk, v, window=ctx.window, key_valid=ctx.key_valid, chunk=bs, skip_own_chunk=True
        )
        on_support = support_feature_attention(
            fq, lq, fk, lk, v, support, window=ctx.window, key_valid=ctx.key_valid, skip_diagonal=True
        )
        off_out, off_lse = subtract(low.out, low.lse, on_support.out, on_support.lse)
        seen = earlier_chunk_keys(Tq, Tk, bs, ctx.window, ctx.key_valid, B, q.device)[:, None]  # [B, 1, Tq]
        off_lse = off_lse.masked_fill(on_support.covered >= seen, float("-inf"))  # nothing off the support
        out, lse = merge(exact.out, exact.lse, off_out.to(exact.out.dtype), off_lse.to(exact.lse.dtype))
        return AttnOutput(out.to(q.dtype), exact.cells + low.cells, estimate_s, lse)

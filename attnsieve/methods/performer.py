"""Performer: softmax attention estimated with FAVOR+ positive orthogonal random features.

Queries and keys pass through phi(x) = exp(W x - |x|^2 / 2) / sqrt(m) (x scaled by sqrt(scale),
W orthogonal Gaussian blocks with chi-distributed row norms), an unbiased estimate of
exp(q . k * scale), and causal attention runs as chunked prefix sums over phi(k) v^T: linear in the
length, no support at all. Choromanski et al., "Rethinking Attention with Performers", ICLR 2021
(arXiv:2009.14794).

Hyperparameters: `nb_features` (random features m; None: the reference code's round(d ln d) for
head dimension d), `seed` (the projection is drawn from seed and layer index: fixed and
deterministic, no redraw), `chunk` (tokens per chunk of the causal prefix sums: earlier chunks act
through the running state, the own chunk through exact feature products), `hyperbolic` (the
paper's SM_hyp+ variant, features exp(+-W x - |x|^2 / 2), half the rows each).

Deviations from the paper and its code, and why:
- Causal prefix sums run in chunks with log-space shifts: each key keeps its own maximum exponent
  (the reference subtracts one global key maximum, which would let a later key rescale an earlier
  one: a causal leak through rounding) and each query row rescales against the largest shift it
  sees. The reference's +1e-6 stabiliser is dropped: the shifts already prevent overflow and
  underflow, and the stabiliser biases the estimate.
- Features are drawn once per (seed, layer), never redrawn (the paper redraws during training).
- Measured density counts the query-key feature products computed one by one: the own chunk's
  causal triangle (and the window edge on sliding layers), about chunk / T of the causal cells;
  everything else goes through the state. With chunk = 1 only the diagonal is counted.
- Sliding layers (ctx.window) use a windowed state: one state per chunk, summed over the chunks
  inside the window, exact products on the chunk cut by the window edge.
There is no setting under which FAVOR+ equals softmax attention (exact_params is None); the tests
check that it is unbiased and that its error falls as nb_features grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from attnsieve.kernels.feature_maps import favor_features, orthogonal_gaussian
from attnsieve.kernels.linear_attention import causal_feature_attention
from attnsieve.methods.base import AttnOutput, Method
from attnsieve.methods.registry import register


@dataclass
class PerformerParams:
    nb_features: int | None = field(
        default=None, metadata={"help": "random features m (>= 1; None: round(d ln d) for head dim d)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random projection (combined with the layer index)"})
    chunk: int = field(default=64, metadata={"help": "tokens per chunk of the causal prefix sums (1..4096)"})
    hyperbolic: bool = field(
        default=False, metadata={"help": "SM_hyp+ features exp(+-Wx - |x|^2/2) instead of exp(Wx - |x|^2/2)"}
    )

    def __post_init__(self):
        if self.nb_features is not None and self.nb_features < (2 if self.hyperbolic else 1):
            raise ValueError(f"nb_features must be >= {2 if self.hyperbolic else 1}, got {self.nb_features}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 1 <= self.chunk <= 4096:
            raise ValueError(f"chunk must be in [1, 4096], got {self.chunk}")


def at_least_fp32(x):
    """Exponential features are computed in fp32 at least."""
    return x.float() if x.element_size() < 4 else x


def default_features(head_dim: int) -> int:
    """The reference code's default: round(d ln d) (at least 1)."""
    return max(1, round(head_dim * math.log(head_dim)))


def favor_qk(q, k, scale: float, nb_features: int | None, seed: int, layer: int, hyperbolic: bool):
    """FAVOR+ features of q and k with one projection per (seed, layer): (fq, lq, fk, lk)."""
    D = q.shape[-1]
    m = default_features(D) if nb_features is None else nb_features
    rows = m // 2 if hyperbolic else m
    proj = orthogonal_gaussian(rows, D, seed * 100_003 + layer, dtype=q.dtype, device=q.device)
    fq, lq = favor_features(q, proj, scale, hyperbolic=hyperbolic)
    fk, lk = favor_features(k, proj, scale, hyperbolic=hyperbolic)
    return fq, lq, fk, lk


@register(
    "performer",
    family="lowrank",
    phases=("prefill",),
    params=PerformerParams,
    summary="Performer FAVOR+: positive orthogonal random features, causal chunked prefix sums.",
)
class Performer(Method):
    exact_params = None  # a random-feature estimate; no setting equals softmax attention

    def prefill(self, q, k, v, ctx):
        p = self.params
        fq, lq, fk, lk = favor_qk(
            at_least_fp32(q), at_least_fp32(k), ctx.scale, p.nb_features, p.seed, ctx.layer_idx, p.hyperbolic
        )
        res = causal_feature_attention(fq, lq, fk, lk, v, window=ctx.window, key_valid=ctx.key_valid, chunk=p.chunk)
        return AttnOutput(res.out.to(q.dtype), res.cells, 0.0, res.lse)

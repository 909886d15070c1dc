"""Nystromformer: softmax attention approximated from segment-mean landmarks (non-causal only).

Queries and keys are averaged over `num_landmarks` contiguous segments; the attention matrix is
approximated by softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T), with the pseudo-inverse from
the paper's iteration, so the cost is linear in the length. Xiong et al., "Nystromformer: A
Nystrom-Based Algorithm for Approximating Self-Attention", AAAI 2021 (arXiv:2102.03902).

Hyperparameters: `num_landmarks` (segments, paper default 64; capped at the length, and with as
many landmarks as tokens the approximation is exact up to the pseudo-inverse iteration),
`pinv_iterations` (iterations of the pseudo-inverse, paper default 6).

Non-causal: the landmarks mix every position of a segment, so a causal layer cannot use it;
`prefill` refuses causal (and sliding-window) layers with a ValueError. Use it in bidirectional
encoder layers (LayerContext(..., causal=False)), including queries over a fixed set of keys.

Deviations, and why:
- The paper's learned depthwise convolution on V (a skip connection) is omitted: it is trained.
- Landmarks are means of the real tokens only (the reference averages zeroed padding into them),
  so padding keys are never attended; a row with fewer real tokens than landmarks gets one
  landmark per token.
- The pseudo-inverse starts from Z0 = A^T / (||A||_1 ||A||_inf) per matrix (the reference's
  "original" option takes the maximum over the whole batch, which couples batch rows).
- The returned lse is an estimate (log-sum-exp against the key landmarks weighted by segment
  size); no exact normaliser exists without the full score matrix.
Measured density is 0: no query-key score is computed (only scores against landmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attnsieve.kernels.nystrom import nystrom_attention
from attnsieve.methods.base import AttnOutput, Method
from attnsieve.methods.registry import register


@dataclass
class NystromParams:
    num_landmarks: int = field(default=64, metadata={"help": "landmarks (segment means) of queries and keys (>= 1)"})
    pinv_iterations: int = field(default=6, metadata={"help": "iterations of the pseudo-inverse (>= 1)"})

    def __post_init__(self):
        if self.num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {self.num_landmarks}")
        if self.pinv_iterations < 1:
            raise ValueError(f"pinv_iterations must be >= 1, got {self.pinv_iterations}")


@register(
    "nystrom",
    family="lowrank",
    phases=("prefill",),
    supports_causal_mask=False,
    params=NystromParams,
    summary="Nystromformer: segment-mean landmarks and an iterative pseudo-inverse (non-causal layers only).",
)
class Nystrom(Method):
    exact_params = None  # exact only with landmarks = tokens (non-causal); the generic checks are causal

    def prefill(self, q, k, v, ctx):
        if ctx.causal:
            raise ValueError(
                "nystrom is non-causal; use it in bidirectional encoders (layers with causal=False), "
                "not in a causal decoder layer"
            )
        if ctx.window is not None:
            raise ValueError(f"nystrom does not support sliding-window layers (window={ctx.window})")
        p = self.params
        out, lse = nystrom_attention(
            q, k, v, num_landmarks=p.num_landmarks, iterations=p.pinv_iterations, scale=ctx.scale,
            key_valid=ctx.key_valid,
        )
        return AttnOutput(out, 0, 0.0, lse)

"""Exact attention: torch's fused SDPA on global layers, banded local attention on sliding ones.

This is attnsieve's exact path (`exact` in reports). It differs from stock transformers only in
how sliding-window layers run: as true local attention (O(T * window)) instead of a masked full
matrix, with the same result. No hyperparameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnsieve.methods.base import Method, exact_attention
from attnsieve.methods.registry import register


@dataclass
class DenseParams:
    """Dense attention has no hyperparameters."""


@register(
    "dense",
    family="exact",
    phases=("prefill", "decode"),
    params=DenseParams,
    summary="Exact attention (fused SDPA; sliding-window layers as true local attention).",
)
class Dense(Method):
    bidirectional = True
    exact_params = {}  # degenerate setting: equals dense attention

    def prefill(self, q, k, v, ctx):
        return exact_attention(q, k, v, ctx)

"""The narrow contract every attention method implements, and the exact path they fall back on.

A method receives one layer's post-RoPE queries and the layer's keys/values (grouped-query layout,
never repeated) and returns the attention output plus how many query-key cells it computed. A
sparse method implements only `support()` ("given q and k, which key blocks?"); the base class
owns execution, timing of the estimate, and measurement. Methods know nothing about transformers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnsieve.kernels import BlockSupport, exact_cells, local_attention, support_attention, token_mask


def estimate_clock(x: torch.Tensor) -> float:
    """Seconds for timing an estimate: on CUDA, after the queued kernels finish (kernels are async,
    so an unsynchronised clock would time only their launch). Two of these per layer are the only
    host syncs timing adds; on the CPU it is the plain clock."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


@dataclass
class LayerContext:
    """What a method knows about the layer it runs in."""

    layer_idx: int
    scale: float  # softmax scale of the layer (e.g. query_pre_attn_scalar ** -0.5 for Gemma-3)
    window: int | None = None  # the layer's native sliding window in tokens (None: global layer)
    key_valid: torch.Tensor | None = None  # [B, Tk] bool, False on padding; None when no padding
    causal: bool = True  # False in bidirectional (encoder) layers; non-causal methods refuse causal ones

    def __post_init__(self):
        # Every method sees a bool mask: an integer 0/1 mask (transformers' attention_mask is int64)
        # is converted here once, so no method fails on it or reads it differently from another.
        kv = self.key_valid
        if kv is None:
            return
        if not isinstance(kv, torch.Tensor) or kv.dim() != 2:
            raise TypeError(f"key_valid must be a [B, Tk] bool tensor or None, got {_what(kv)}")
        if kv.dtype is not torch.bool:
            if kv.dtype.is_floating_point or kv.dtype.is_complex or not bool(((kv == 0) | (kv == 1)).all()):
                raise TypeError(f"key_valid must be bool, or integer with values 0 and 1, got {_what(kv)}")
            self.key_valid = kv.to(torch.bool)


def _what(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return f"{type(x).__name__} {x!r}"


@dataclass
class AttnOutput:
    out: torch.Tensor  # [B, H, Tq, Dv]
    cells: int  # query-key cells whose scores were computed (measured density numerator)
    estimate_s: float = 0.0  # seconds spent choosing the support (0 for static patterns)
    lse: torch.Tensor | None = None  # [B, H, Tq] when the path produces it
    # Cells whose scores were computed but whose exponentials and value products were skipped by a
    # rule inside the softmax (BLASST); they are included in `cells`, reported apart.
    skipped_cells: int = 0


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """Exact causal attention with torch's fused SDPA, never passing is_causal=True when Tq < Tk."""
    Tq, Tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    mask = None
    causal = False
    if not ctx.causal:  # bidirectional layer: every real key
        mask = None if ctx.key_valid is None else ctx.key_valid[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=ctx.scale, enable_gqa=gqa)
    if ctx.key_valid is not None:
        q_pos, k_pos = torch.arange(Tk - Tq, Tk, device=q.device), torch.arange(Tk, device=q.device)
        mask = token_mask(q_pos, k_pos, causal=True, window=None)[None, None] & ctx.key_valid[:, None, None, :]
        # Padding queries have no real key; let them see themselves so no row is empty (their
        # outputs are never used, and no real query ever sees a padding key).
        mask = mask | (k_pos[None, :] == q_pos[:, None])[None, None]
    elif Tq == Tk:
        causal = True
    elif Tq > 1:
        q_pos, k_pos = torch.arange(Tk - Tq, Tk, device=q.device), torch.arange(Tk, device=q.device)
        mask = token_mask(q_pos, k_pos, causal=True, window=None)[None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=ctx.scale, enable_gqa=gqa)


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: LayerContext) -> AttnOutput:
    """The layer's exact attention: banded local attention on sliding layers, fused SDPA otherwise."""
    Tq, Tk = q.shape[2], k.shape[2]
    if ctx.window is not None and ctx.window < Tk:
        res = local_attention(q, k, v, window=ctx.window, scale=ctx.scale, key_valid=ctx.key_valid)
        return AttnOutput(res.out, res.cells, lse=res.lse)
    out = sdpa_attention(q, k, v, ctx)
    cells = q.shape[1] * exact_cells(Tq, Tk, causal=ctx.causal, key_valid=ctx.key_valid, batch=q.shape[0])
    return AttnOutput(out, cells)


class Method:
    """Base class. Subclasses are registered with `@register`, which sets the class attributes."""

    name: ClassVar[str]
    family: ClassVar[str]
    phases: ClassVar[tuple[str, ...]]
    # Whether the method can mask the future at all (Nystrom cannot: it refuses causal layers).
    supports_causal_mask: ClassVar[bool] = True
    # Whether the method's default estimate looks ahead within the call, as its paper does (the
    # prompt's last queries, a block's own queries); set by @register from the `causal` parameter.
    lookahead: ClassVar[bool] = False
    Params: ClassVar[type]
    summary: ClassVar[str]
    # Parameters under which the method must equal dense attention (None: it has no such setting).
    exact_params: ClassVar[dict | None] = None
    # Whether the method can run in bidirectional (encoder) layers; non-causal methods always can.
    bidirectional: ClassVar[bool] = False

    @classmethod
    def runs_bidirectional(cls) -> bool:
        return cls.bidirectional or not cls.supports_causal_mask

    def __init__(self, params=None):
        self.params = self.Params() if params is None else params

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: LayerContext) -> AttnOutput:
        raise NotImplementedError

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: LayerContext) -> AttnOutput:
        """Decoding steps are exact unless a method implements its own decoding."""
        return exact_attention(q, k, v, ctx)

    def __repr__(self) -> str:
        return f"{self.name}({self.params})"


class SparseMethod(Method):
    """A method that only estimates a support; the shared kernels execute it exactly.

    `support()` returns key blocks per query block and, optionally, single key tokens beyond them
    (`BlockSupport.tokens`); the base class times the estimate, runs the blocks on the
    block-sparse kernel and the tokens on the token-gather kernel, and merges the two exactly.
    """

    # Whether support() may return single key tokens besides blocks (BlockSupport.tokens).
    selects_tokens: ClassVar[bool] = False

    def support(self, q: torch.Tensor, k: torch.Tensor, ctx: LayerContext) -> BlockSupport:
        raise NotImplementedError

    def prefill(self, q, k, v, ctx):
        t0 = estimate_clock(q)
        support = self.support(q, k, ctx)
        estimate_s = estimate_clock(q) - t0
        res = support_attention(
            q, k, v, support, causal=True, window=ctx.window, scale=ctx.scale, key_valid=ctx.key_valid
        )
        return AttnOutput(res.out, res.cells, estimate_s, res.lse)

"""Reference dense attention that also returns the log-sum-exp of the scores it covered.

This is the slow, obviously-correct oracle every fast path is tested against, and the exact
kernel used wherever a partial result must be merged. Grouped-query attention is computed by
folding the query heads of a KV group into the row dimension, so keys are never repeated.
"""

from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def token_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    window: int | None,
) -> torch.Tensor:
    """Boolean mask [..., Tq, Tk] of the cells an exact (optionally sliding-window) layer computes.

    `window` follows transformers' convention: a query sees the `window` most recent keys,
    itself included (key allowed when q - k < window).
    """
    diff = q_pos[..., :, None] - k_pos[..., None, :]  # [..., Tq, Tk]
    allowed = torch.ones_like(diff, dtype=torch.bool)
    if causal:
        allowed &= diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


def softmax_with_lse(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scores) @ v and logsumexp(scores) over the last axis; -inf scores are masked.

    A row with no finite score gives a zero output and lse = -inf (never NaN).
    """
    m = scores.amax(dim=-1, keepdim=True)  # [..., R, 1]
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p.to(v.dtype), v) / denom.clamp_min(torch.finfo(denom.dtype).tiny).to(v.dtype)
    lse = (m + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
    return out, lse


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    q_chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over all keys allowed by the masks; returns (out [B,H,Tq,D], lse [B,H,Tq]).

    q: [B, H, Tq, D]; k, v: [B, Hkv, Tk, D] with H % Hkv == 0 and Tq <= Tk when causal. Query i
    sits at absolute position Tk - Tq + i. `key_valid` [B, Tk] marks real (non-padding) keys;
    `mask` is an extra boolean mask broadcastable to [B, 1, Tq, Tk]. Queries are processed in
    chunks of `q_chunk` rows so memory stays O(q_chunk * Tk) per head.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qg = q.reshape(B, Hkv, G, Tq, D).to(acc)
    kt = k.to(acc).transpose(-1, -2)  # [B, Hkv, D, Tk]
    vv = v.to(acc)
    k_pos = torch.arange(Tk, device=q.device)
    out = torch.empty(B, Hkv, G, Tq, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.empty(B, Hkv, G, Tq, dtype=acc, device=q.device)
    for s in range(0, Tq, q_chunk):
        e = min(s + q_chunk, Tq)
        q_pos = torch.arange(Tk - Tq + s, Tk - Tq + e, device=q.device)
        scores = torch.matmul(qg[:, :, :, s:e], kt.unsqueeze(2)) * scale  # [B, Hkv, G, c, Tk]
        allowed = token_mask(q_pos, k_pos, causal=causal, window=window)[None, None, None]
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, None, None, :]
        if mask is not None:
            allowed = allowed & mask[..., s:e, :].unsqueeze(2)
        scores = scores.masked_fill(~allowed, NEG_INF)
        o, l = softmax_with_lse(scores, vv.unsqueeze(2))
        out[:, :, :, s:e] = o
        lse[:, :, :, s:e] = l
    return out.reshape(B, H, Tq, -1).to(q.dtype), lse.reshape(B, H, Tq)


def exact_cells(
    Tq: int,
    Tk: int,
    *,
    causal: bool = True,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    batch: int = 1,
) -> int:
    """Number of query-key cells the exact layer computes (the denominator of measured density).

    Per head, summed over the batch: `key_valid` [B, Tk] gives the rows, else `batch` unpadded rows.

    Only real queries and real keys count: with padding, query i is real when key Tk - Tq + i is.
    Computed in O(B * Tk) from a prefix sum, never from a Tq x Tk mask.
    """
    if key_valid is None:
        key_valid = torch.ones(batch, Tk, dtype=torch.bool)
    kv = key_valid.to(torch.int64).cpu()
    csum = torch.nn.functional.pad(kv.cumsum(-1), (1, 0))  # csum[:, j] = valid keys in [0, j)
    q_pos = torch.arange(Tk - Tq, Tk)
    hi = (q_pos + 1) if causal else torch.full_like(q_pos, Tk)
    lo = (q_pos + 1 - window).clamp_min(0) if window is not None else torch.zeros_like(q_pos)
    if window is not None and not causal:
        raise ValueError("a sliding window is only defined here for causal layers")
    per_query = csum[:, hi] - csum[:, lo]  # [B, Tq]
    return int((per_query * kv[:, Tk - Tq :]).sum())

"""Nystrom approximation of (non-causal) softmax attention from segment-mean landmarks.

softmax(Q K^T) V ~ softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V, where Q~ and K~ are the
means of L contiguous segments of the (real) queries and keys; Xiong et al., "Nystromformer: A
Nystrom-Based Algorithm for Approximating Self-Attention", AAAI 2021 (arXiv:2102.03902). The
pseudo-inverse is the paper's iteration Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4 from
Z0 = A^T / (||A||_1 ||A||_inf). Cost O((Tq + Tk) * L * D + L^3); never a Tq x Tk tensor.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def segment_means(x: torch.Tensor, valid: torch.Tensor, n_seg: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of `n_seg` contiguous, nearly equal segments of the valid tokens of each batch row.

    x: [B, Hx, T, D]; valid: [B, T] bool. Returns (means [B, Hx, n_seg, D], counts [B, n_seg]);
    a row with fewer valid tokens than segments gets one token per segment and empty segments
    (count 0), which callers mask out.
    """
    B, Hx, T, D = x.shape
    rank = valid.long().cumsum(-1) - 1
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    seg = torch.where(valid, rank * n_seg // n, torch.full_like(rank, n_seg))  # padding: extra bin
    xs = x.masked_fill(~valid[:, None, :, None], 0.0)
    sums = x.new_zeros(B, Hx, n_seg + 1, D).scatter_add_(2, seg[:, None, :, None].expand(B, Hx, T, D), xs)
    counts = torch.zeros(B, n_seg + 1, dtype=x.dtype, device=x.device).scatter_add_(1, seg, valid.to(x.dtype))
    means = sums[:, :, :n_seg] / counts[:, None, :n_seg, None].clamp_min(1)
    return means, counts[:, :n_seg]


def iterative_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a [..., m, n] by Nystromformer's iteration (per matrix)."""
    norm1 = a.abs().sum(-2).amax(-1)  # max column sum
    norm_inf = a.abs().sum(-1).amax(-1)  # max row sum (1 for softmax rows)
    z = a.transpose(-1, -2) / (norm1 * norm_inf).clamp_min(torch.finfo(a.dtype).tiny)[..., None, None]
    eye = torch.eye(a.shape[-2], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _masked_softmax(s: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where `keep`; rows with nothing kept are all zero."""
    s = s.masked_fill(~keep, NEG_INF)
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def nystrom_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_landmarks: int,
    iterations: int = 6,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal Nystrom attention; returns (out [B, H, Tq, Dv], lse [B, H, Tq]).

    q: [B, H, Tq, D]; k, v: [B, Hkv, Tk, D] (query heads of a KV group share the key landmarks);
    query i sits at position Tk - Tq + i and is real where key_valid is. Landmarks come from real
    tokens only, so padding keys are never attended. `lse` is an estimate: the log-sum-exp of the
    query's scores against the key landmarks, each weighted by its segment's size.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if num_landmarks < 1:
        raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
    G = H // Hkv
    scale = D**-0.5 if scale is None else scale
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    dev = q.device
    kv_valid = torch.ones(B, Tk, dtype=torch.bool, device=dev) if key_valid is None else key_valid.to(dev, torch.bool)
    q_valid = kv_valid[:, Tk - Tq :]
    qs = q.to(acc) * scale
    kk, vv = k.to(acc), v.to(acc).masked_fill(~kv_valid[:, None, :, None], 0.0)
    ql, q_cnt = segment_means(qs, q_valid, min(num_landmarks, Tq))  # [B, H, Lq, D]
    kl, k_cnt = segment_means(kk, kv_valid, min(num_landmarks, Tk))  # [B, Hkv, Lk, D]
    Lq, Lk = ql.shape[2], kl.shape[2]
    k_land = (k_cnt > 0)[:, None, None, :]  # [B, 1, 1, Lk]
    q_land = (q_cnt > 0)[:, None, None, :, None]  # [B, 1, 1, Lq, 1]

    qg = qs.reshape(B, Hkv, G * Tq, D)
    qlg = ql.reshape(B, Hkv, G * Lq, D)
    s1 = qg @ kl.transpose(-1, -2)  # [B, Hkv, G * Tq, Lk]
    kernel1 = _masked_softmax(s1, k_land)
    kernel2 = _masked_softmax(qlg @ kl.transpose(-1, -2), k_land).view(B, Hkv, G, Lq, Lk)
    kernel2 = kernel2.masked_fill(~q_land, 0.0)  # empty query landmarks: zero rows, zero pinv columns
    kernel3 = _masked_softmax(qlg @ kk.transpose(-1, -2), kv_valid[:, None, None, :])  # [B, Hkv, G * Lq, Tk]
    k3v = (kernel3 @ vv).view(B, Hkv, G, Lq, Dv).masked_fill(~q_land, 0.0)
    mid = iterative_pinv(kernel2, iterations) @ k3v  # [B, Hkv, G, Lk, Dv]
    out = kernel1.view(B, Hkv, G, Tq, Lk) @ mid
    log_cnt = torch.log(k_cnt.clamp_min(1))[:, None, None, :].masked_fill(~k_land, NEG_INF)
    lse = torch.logsumexp(s1 + log_cnt, dim=-1)
    return out.reshape(B, H, Tq, Dv).to(q.dtype), lse.reshape(B, H, Tq)

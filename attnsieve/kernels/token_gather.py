"""Exact attention over per-query-block lists of single key tokens (the token-gather path).

Some supports are finer than blocks: MInference's vertical columns, AnchorAttention's stripes,
TokenSelect's tokens. Covering each selected token with a whole key block would compute (and
count) up to `block_size` times more cells than the method chose, so these supports gather the
chosen key tokens themselves: for every batch row, support head and query block, a list of key
positions. The kernel gathers those keys in bounded chunks, masks causally (and by window and
padding) at token level, and returns (out, lse, cells) like the block kernel, so a token part
merges exactly with a block part over a disjoint key set (`drop_covered` makes them disjoint).

Layout follows `block_sparse`: query block j covers grid positions [j * bs, (j + 1) * bs), support
heads Hs divide the query heads and are a multiple of the KV heads (Hs = Hkv stacks a group's
queries into one item).
"""

from __future__ import annotations

import math

import torch

from attnsieve.kernels import compiled
from attnsieve.kernels.block_sparse import BlockSupport, SparseResult, block_grid
from attnsieve.kernels.dense import softmax_with_lse

# Largest number of score + gathered key/value elements one batched step may hold (~64 MB fp32).
DEFAULT_CHUNK_ELEMS = 1 << 24


def drop_covered(tokens: torch.Tensor, support: BlockSupport) -> torch.Tensor:
    """Set to -1 the tokens whose key block the item's block support already attends.

    tokens: [B, Hs, NQ, M] key positions (-1 unused); support: same B, Hs, NQ. Returns a copy.
    Duplicate positions within a list are also dropped (each key counts once).
    """
    bs = support.block_size
    if support.blocks.shape[:3] != tokens.shape[:3]:
        raise ValueError(f"tokens {tuple(tokens.shape)} and support {tuple(support.blocks.shape)} differ in B/Hs/NQ")
    blk = torch.where(tokens >= 0, tokens // bs, -2)  # [B, Hs, NQ, M]
    covered = (blk[..., :, None] == support.blocks[..., None, :]).any(-1)
    out = torch.where(covered, torch.full_like(tokens, -1), tokens)
    # duplicates: keep the first occurrence of each position in a list
    srt, perm = out.sort(dim=-1)
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[..., 1:] = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    srt = torch.where(dup, torch.full_like(srt, -1), srt)
    return torch.empty_like(out).scatter_(-1, perm, srt)


def token_gather_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tokens: torch.Tensor,
    block_size: int,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    row_mask: torch.Tensor | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    backend: str | None = None,
) -> SparseResult:
    """Exact attention of each query block over its own list of key tokens.

    q: [B, H, Tq, D]; k: [B, Hkv, Tk, D]; v: [B, Hkv, Tk, Dv]; tokens: int64 [B, Hs, NQ, M] key
    positions in [0, Tk) (-1 marks an unused slot; positions in a list must be distinct);
    row_mask: optional bool [B, Hs, NQ, R, M] restricting each query row to some of the list.
    A key is attended only where the exact layer would (causal, window, padding). Rows with no
    key get out 0 and lse -inf. `cells` counts the computed (query, key) cells.

    `backend`: "compiled" (attnsieve's C++ kernel: listed keys copied 64 at a time into a tile,
    flash-style; float32, and bf16 on the CPU's matrix units where present), "torch" (gathers and
    batched matmuls, any device and dtype), or None / "auto" for the compiled one where it runs.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    bs = block_size
    first_qb, n_q, n_k = block_grid(Tq, Tk, bs)
    if tokens.dim() != 4 or tokens.shape[0] != B or tokens.shape[2] != n_q:
        raise ValueError(
            f"tokens must be [B={B}, Hs, NQ={n_q}, M] for Tq={Tq}, Tk={Tk}, block_size={bs}; got {tuple(tokens.shape)}"
        )
    Hs, M = tokens.shape[1], tokens.shape[3]
    if H % Hs or Hs % Hkv:
        raise ValueError(f"support heads ({Hs}) must divide query heads ({H}) and be a multiple of {Hkv}")
    if bool((tokens >= Tk).any()):
        raise ValueError(f"token positions must be < Tk={Tk}, got max {int(tokens.max())}")
    Gs = H // Hs
    R = Gs * bs
    if row_mask is not None and tuple(row_mask.shape) != (B, Hs, n_q, R, M):
        raise ValueError(f"row_mask must be {(B, Hs, n_q, R, M)}, got {tuple(row_mask.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    dev = q.device
    runs_compiled = dev.type == "cpu" and acc == torch.float32 and compiled.available()
    if backend in (None, "auto"):
        backend = "compiled" if runs_compiled else "torch"
    elif backend not in ("compiled", "torch"):
        raise ValueError(f"backend must be one of auto, compiled, torch; got {backend!r}")
    elif backend == "compiled" and not runs_compiled:
        raise ValueError(f"backend 'compiled' needs float32 on CPU and attnsieve's compiled kernel; got {acc} on {dev}")

    lead = (Tk - Tq) - first_qb * bs
    qp = q.new_zeros(B, H, n_q * bs, D)
    qp[:, :, lead : lead + Tq] = q
    q_items = qp.view(B, Hs, Gs, n_q, bs, D).transpose(2, 3).reshape(B * Hs * n_q, R, D)
    k_flat = k.reshape(B * Hkv * Tk, D)
    v_flat = v.reshape(B * Hkv * Tk, Dv)
    valid = torch.ones(B, Tk, dtype=torch.bool, device=dev) if key_valid is None else key_valid.to(dev, torch.bool)
    q_valid = torch.zeros(B, n_k * bs, dtype=torch.bool, device=dev)
    q_valid[:, Tk - Tq : Tk] = valid[:, Tk - Tq :]

    N = B * Hs * n_q
    if backend == "compiled":
        items = torch.arange(N, device=dev)
        b_i, s_i, j_i = items // (Hs * n_q), (items // n_q) % Hs, items % n_q
        kv_of_s = torch.arange(Hs, device=dev) * Hkv // Hs
        row_pos = ((first_qb + j_i) * bs)[:, None] + torch.arange(R, device=dev) % bs  # [N, R]
        q_ok = q_valid[b_i[:, None], row_pos]
        empty = torch.empty(0, dtype=torch.bool, device=dev)
        cd = compiled.native_dtype(q.dtype, 16, D, Dv)  # bf16 natively where the CPU can
        out_items, lse_items, n_cells = compiled.module().token_gather_forward(
            q_items.to(cd).contiguous(), k.reshape(B * Hkv, Tk, D).to(cd).contiguous(),
            v.reshape(B * Hkv, Tk, Dv).to(cd).contiguous(), tokens.reshape(N, M).contiguous(),
            (b_i * Hkv + kv_of_s[s_i]).contiguous(), b_i.contiguous(), ((first_qb + j_i) * bs).contiguous(),
            empty if row_mask is None else row_mask.reshape(N, R, M).contiguous(),
            empty if key_valid is None else valid.contiguous(), empty if bool(q_ok.all()) else q_ok.contiguous(),
            bs, causal, -1 if window is None else int(window), float(scale),
        )
        out = out_items.view(B, Hs, n_q, Gs, bs, Dv).transpose(2, 3).reshape(B, H, n_q * bs, Dv)
        lse = lse_items.view(B, Hs, n_q, Gs, bs).transpose(2, 3).reshape(B, H, n_q * bs)
        return SparseResult(out[:, :, lead : lead + Tq].to(q.dtype), lse[:, :, lead : lead + Tq], int(n_cells))
    # Valid slots first in every list, then items ordered by list length, so each chunk gathers
    # only as many keys as its longest list (lists of very different lengths cost no padding).
    tok, perm = tokens.reshape(N, M).sort(dim=-1, descending=True)
    rmask = None
    if row_mask is not None:
        rmask = torch.gather(row_mask.reshape(N, R, M), 2, perm[:, None, :].expand(N, R, M))
    counts = (tok >= 0).sum(-1)
    order = torch.argsort(counts, stable=True)
    counts_sorted = counts[order].tolist()
    kv_of_s = torch.arange(Hs, device=dev) * Hkv // Hs
    row_off = torch.arange(R, device=dev) % bs
    out_items = torch.zeros(N, R, Dv, dtype=acc, device=dev)
    lse_items = torch.full((N, R), float("-inf"), dtype=acc, device=dev)
    cells = torch.zeros((), dtype=torch.int64, device=dev)
    start = next((i for i, c in enumerate(counts_sorted) if c > 0), N)
    while start < N:
        # as many items as fit the element budget at this width, halved while the widest does not fit
        step = max(1, chunk_elems // max(1, counts_sorted[start] * (R + D + Dv)))
        end = min(N, start + step)
        while end > start + 1 and (end - start) * counts_sorted[end - 1] * (R + D + Dv) > chunk_elems:
            end = start + max(1, (end - start) // 2)
        mw = counts_sorted[end - 1]
        idx = order[start:end]
        t = tok[idx, :mw]  # [n, mw]
        n = end - start
        ok = t >= 0
        tc = t.clamp_min(0)
        b_i, s_i, j_i = idx // (Hs * n_q), (idx // n_q) % Hs, idx % n_q
        flat = ((b_i * Hkv + kv_of_s[s_i]) * Tk)[:, None] + tc
        kg = k_flat[flat.reshape(-1)].view(n, mw, D).to(acc)
        vg = v_flat[flat.reshape(-1)].view(n, mw, Dv).to(acc)
        q_pos = ((first_qb + j_i) * bs)[:, None] + row_off  # [n, R]
        allowed = (ok & valid[b_i[:, None], tc])[:, None, :] & q_valid[b_i[:, None], q_pos][:, :, None]
        diff = q_pos[:, :, None] - tc[:, None, :]  # [n, R, mw]
        if causal:
            allowed &= diff >= 0
        if window is not None:
            allowed &= diff < window
        if rmask is not None:
            allowed &= rmask[idx, :, :mw]
        cells += allowed.sum()
        scores = torch.bmm(q_items[idx].to(acc), kg.transpose(1, 2)).mul_(scale)
        scores.masked_fill_(~allowed, float("-inf"))
        out_items[idx], lse_items[idx] = softmax_with_lse(scores, vg)
        start = end

    out = out_items.view(B, Hs, n_q, Gs, bs, Dv).transpose(2, 3).reshape(B, H, n_q * bs, Dv)
    lse = lse_items.view(B, Hs, n_q, Gs, bs).transpose(2, 3).reshape(B, H, n_q * bs)
    return SparseResult(out[:, :, lead : lead + Tq].to(q.dtype), lse[:, :, lead : lead + Tq], int(cells))

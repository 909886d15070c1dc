"""The pieces that combine an exact sparse support with a feature-map estimate of the rest.

Scatterbrain (Chen et al., NeurIPS 2021, arXiv:2110.15343) keeps the unnormalised attention
matrix equal to exp(q . k) on a sparse support and to phi(q) . phi(k) off it. Off-support sums are
"all keys" sums minus the support's own feature products, so two kernels live here:

- `support_feature_attention`: the feature products phi(q_i) . phi(k_j) over the cells of a block
  support only (the same gathered key blocks, causal / window / padding / row masks as the
  block-sparse kernel), returned as (out, lse) plus the number of keys each row covered;
- `subtract`: the partial result over S1 minus S2 from partial results over S1 and S2 (S2 inside
  S1), the inverse of `merge`.

Never a Tq x Tk tensor: items are processed in chunks of at most `chunk_elems` elements.
"""

from __future__ import annotations

import torch

from attnsieve.kernels.block_sparse import DEFAULT_CHUNK_ELEMS, BlockSupport, block_grid
from attnsieve.kernels.linear_attention import NEG_INF, FeatureResult


def support_feature_attention(
    fq: torch.Tensor,
    lq: torch.Tensor,
    fk: torch.Tensor,
    lk: torch.Tensor,
    v: torch.Tensor,
    support: BlockSupport,
    *,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    skip_diagonal: bool = False,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> FeatureResult:
    """Causal feature-map attention restricted to the cells of `support`.

    fq: [B, H, Tq, M], lq: [B, H, Tq]; fk: [B, Hkv, Tk, M], lk: [B, Hkv, Tk]; v: [B, Hkv, Tk, Dv];
    phi = f * exp(log shift) as in feature_maps.py. `skip_diagonal` leaves out each query block's
    own key block. Returns out/lse over the covered cells and `covered` [B, H, Tq], the number of
    keys each query row covered.
    """
    B, H, Tq, Fd = fq.shape
    Hkv, Tk, Dv = fk.shape[1], fk.shape[2], v.shape[-1]
    bs = support.block_size
    first_qb, n_q, n_k = block_grid(Tq, Tk, bs)
    blocks = support.blocks
    Hs, K = blocks.shape[1], blocks.shape[3]
    if blocks.shape[0] != B or blocks.shape[2] != n_q:
        raise ValueError(f"support shape {tuple(blocks.shape)} does not match B={B} and {n_q} query blocks")
    if H % Hs or Hs % Hkv:
        raise ValueError(f"support heads ({Hs}) must divide query heads ({H}) and be a multiple of {Hkv}")
    if lk.shape[1] != Hkv:
        raise ValueError(f"key log shifts must have {Hkv} heads, got shape {tuple(lk.shape)}")
    if Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
    Gs = H // Hs
    R = Gs * bs
    N = B * Hs * n_q
    acc = torch.float32 if fq.dtype in (torch.float16, torch.bfloat16) else fq.dtype
    dev = fq.device

    # Queries on the block grid, stacked per support item: [N, R, M] and [N, R].
    lead = (Tk - Tq) - first_qb * bs
    qp = fq.new_zeros(B, H, n_q * bs, Fd, dtype=acc)
    qp[:, :, lead : lead + Tq] = fq
    lqp = fq.new_zeros(B, H, n_q * bs, dtype=acc)
    lqp[:, :, lead : lead + Tq] = lq
    q_items = qp.view(B, Hs, Gs, n_q, bs, Fd).transpose(2, 3).reshape(N, R, Fd)
    lq_items = lqp.view(B, Hs, Gs, n_q, bs).transpose(2, 3).reshape(N, R)
    # Keys padded to whole blocks; padding keys get weight 0 (log shift -inf) and zero features.
    valid = torch.zeros(B, n_k * bs, dtype=torch.bool, device=dev)
    valid[:, :Tk] = True if key_valid is None else key_valid.to(dev, torch.bool)
    pad = n_k * bs - Tk
    fkp = torch.nn.functional.pad(fk.to(acc), (0, 0, 0, pad)).masked_fill(~valid[:, None, :, None], 0.0)
    vp = torch.nn.functional.pad(v.to(acc), (0, 0, 0, pad)).masked_fill(~valid[:, None, :, None], 0.0)
    lkp = torch.nn.functional.pad(lk.to(acc), (0, pad)).masked_fill(~valid[:, None, :], NEG_INF)
    k_blocks = fkp.reshape(B * Hkv * n_k, bs, Fd)
    v_blocks = vp.reshape(B * Hkv * n_k, bs, Dv)
    l_blocks = lkp.reshape(B * Hkv * n_k, bs)
    q_valid_pos = valid.clone()
    q_valid_pos[:, : Tk - Tq] = False

    flat_blocks = blocks.reshape(N, K)
    row_mask = None if support.row_mask is None else support.row_mask.reshape(N, R, K)
    if row_mask is not None and support.row_mask.shape[3] != R:
        raise ValueError(f"row_mask has {support.row_mask.shape[3]} rows per item, expected {R}")
    kv_of_s = torch.arange(Hs, device=dev) * Hkv // Hs
    row_off = torch.arange(R, device=dev) % bs
    col_off = torch.arange(bs, device=dev)
    out_items = torch.zeros(N, R, Dv, dtype=acc, device=dev)
    lse_items = torch.full((N, R), NEG_INF, dtype=acc, device=dev)
    covered = torch.zeros(N, R, dtype=torch.int64, device=dev)
    per_item = K * bs * (2 * R + Fd + Dv)
    step = max(1, chunk_elems // max(1, per_item))
    for start in range(0, N, step):
        idx = torch.arange(start, min(start + step, N), device=dev)
        n = idx.numel()
        blk = flat_blocks[idx]  # [n, K]
        slot_ok = blk >= 0
        blk = blk.clamp_min(0)
        b_i, s_i, j_i = idx // (Hs * n_q), (idx // n_q) % Hs, idx % n_q
        flat = ((b_i * Hkv + kv_of_s[s_i]) * n_k)[:, None] + blk  # [n, K]
        # advanced indexing, not index_select: on CPU the latter is ~10x slower for rows of M floats
        kg = k_blocks[flat.reshape(-1)].view(n, K * bs, Fd)
        vg = v_blocks[flat.reshape(-1)].view(n, K * bs, Dv)
        lg = l_blocks[flat.reshape(-1)].view(n, K * bs)
        k_pos = (blk[:, :, None] * bs + col_off).reshape(n, K * bs)
        q_pos = ((first_qb + j_i) * bs)[:, None] + row_off  # [n, R]
        qb = (first_qb + j_i)[:, None]  # [n, 1] grid index of each item's query block
        keep = slot_ok & (blk <= qb)  # causal at block level; only the diagonal needs token masks
        if skip_diagonal:
            keep = keep & (blk != qb)
        allowed = (keep.repeat_interleave(bs, dim=1) & valid[b_i[:, None], k_pos])[:, None, :]
        allowed = allowed & q_valid_pos[b_i[:, None], q_pos][:, :, None]  # [n, R, K * bs]
        if window is not None or not skip_diagonal:
            diff = (q_pos[:, :, None] - k_pos[:, None, :]).to(torch.int32)
            allowed = allowed & (diff >= 0)
            if window is not None:
                allowed = allowed & (diff < window)
        if row_mask is not None:
            allowed = allowed & row_mask[idx].repeat_interleave(bs, dim=-1)
        le = lg[:, None, :].masked_fill(~allowed, NEG_INF)  # [n, R, K * bs]
        Z = le.amax(-1)
        Zs = torch.where(torch.isfinite(Z), Z, torch.zeros_like(Z))
        A = torch.bmm(q_items[idx], kg.transpose(1, 2)) * torch.exp(le - Zs[..., None])
        den = A.sum(-1)
        ok = den > 0
        num = torch.bmm(A, vg)
        out_items[idx] = torch.where(ok[..., None], num / torch.where(ok, den, 1.0)[..., None], 0.0)
        lse_items[idx] = torch.where(ok, torch.log(torch.where(ok, den, 1.0)) + lq_items[idx] + Zs, NEG_INF)
        cnt = allowed.sum(-1)
        covered[idx] = cnt

    cells = int(covered.sum())  # one read for all chunks
    out = out_items.view(B, Hs, n_q, Gs, bs, Dv).transpose(2, 3).reshape(B, H, n_q * bs, Dv)
    lse = lse_items.view(B, Hs, n_q, Gs, bs).transpose(2, 3).reshape(B, H, n_q * bs)
    cov = covered.view(B, Hs, n_q, Gs, bs).transpose(2, 3).reshape(B, H, n_q * bs)
    sl = slice(lead, lead + Tq)
    return FeatureResult(out[:, :, sl].to(v.dtype), lse[:, :, sl], cells, cov[:, :, sl])


def subtract(
    out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial result over S1 minus S2, given partial results over S1 and over S2 (inside S1).

    out [..., T, D], lse [..., T]. Where the second normaliser reaches the first (nothing left, or
    estimates that overlap more than they should), the difference is empty: out 0, lse -inf.
    """
    finite = torch.isfinite(lse1)
    d = lse2 - torch.where(finite, lse1, torch.zeros_like(lse1))  # log(normaliser2 / normaliser1)
    left = finite & (d < 0)  # something is left only where S2 holds less than S1
    d = torch.where(left, d, torch.full_like(d, -1.0))
    r = torch.exp(d)
    rest = -torch.expm1(d)  # 1 - r without cancellation
    out = (out1.to(r.dtype) - r[..., None] * out2.to(r.dtype)) / rest[..., None]
    out = torch.where(left[..., None], out, torch.zeros_like(out))
    lse = torch.where(left, lse1 + torch.log(rest), torch.full_like(lse1, NEG_INF))
    return out.to(out1.dtype), lse

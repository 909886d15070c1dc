"""Block-wise online softmax with an in-kernel skip rule (BLASST), never a Tq x Tk matrix.

Every query block visits its causal key blocks in FlashAttention order (key block 0, the sink,
first; the diagonal block last) and keeps a running row maximum. A query row skips a key block
when the block's largest score for that row lies more than |ln lambda| below the row's running
maximum (`block_max - running_max < log_threshold`): the block then contributes nothing to that
row, and the paper's kernel skips its exponentials and its value product. The scores themselves
are computed for every block (that is how the rule sees the block maximum), so `cells` counts
every scored cell, exactly as dense attention would, and `skipped_cells` reports the scored cells
the rule removed from the softmax.

The decision is per query row, so no row's output depends on another row (no causal leak). The
paper's kernel decides per tile (all rows of a tile must agree, a warp vote). Here a tile whose
rows all skip is dropped from the step's exponentials and value product when at most half of the
step's tiles keep the block (gathering costs more than it saves otherwise); in every other case
the skipping rows subtract +inf, so their exponentials are exactly 0 in one dense pass. What the
rule removes from the softmax is the same either way, and `skipped_cells` counts it.
`log_threshold = -inf` never skips, and the result equals dense attention.

The loop runs, per batch row and KV head, over key-block steps; each step is one matrix product
over all query blocks that see the key block, so extra memory is O(Tq * D) plus one step's
[query blocks x block x block] scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsieve.kernels.block_sparse import block_grid
from attnsieve.kernels.dense import exact_cells


@dataclass
class SkipResult:
    out: torch.Tensor  # [B, H, Tq, Dv]
    lse: torch.Tensor  # [B, H, Tq] log-sum-exp of the scores kept in the softmax
    cells: int  # query-key cells whose scores were computed (every cell of the exact layer)
    skipped_cells: int  # of those, cells the skip rule removed from the softmax (all heads, batch rows)
    skipped_per_batch: torch.Tensor  # [B] int64, skipped cells of each batch row (all heads)
    gap_hist: torch.Tensor | None  # [B, n_edges + 1] cell-weighted histogram of the gaps


def skip_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    log_threshold: float | torch.Tensor,
    window: int | None = None,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    block_size: int = 128,
    hist_bins: tuple[float, float, int] | None = None,
    gap_shift: torch.Tensor | None = None,
) -> SkipResult:
    """Causal attention with BLASST's skip rule inside a block-wise online softmax.

    q: [B, H, Tq, D]; k: [B, Hkv, Tk, D]; v: [B, Hkv, Tk, Dv]; query i sits at absolute position
    Tk - Tq + i. log_threshold: ln(lambda), a float or [B, Tq] per query row (-inf: never skip;
    values above 0 act as 0). A row skips key block j when max_j(scores) - running_max < ln(lambda),
    where running_max covers the key blocks it visited before j (skipped blocks never raise it).

    hist_bins = (lo, step, n_edges) / gap_shift (optional, for threshold calibration): the kernel
    bins every (real query row, visited key block) pair's gap `block_max - running_max +
    gap_shift[b, i]` (+inf for a row's first block, which no threshold skips) on the uniform edges
    lo, lo + step, ..., lo + (n_edges - 1) * step as `torch.bucketize` would (bin 0: gap <= lo;
    bin n_edges: above the last edge), weighted by the pair's cells, and returns the histogram
    per batch row.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
    G, bs, dev = H // Hkv, block_size, q.device
    R = G * bs  # rows of one (query block, KV head) item: G heads of bs queries, head-major
    scale = D**-0.5 if scale is None else scale
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    lead = (Tk - Tq) - first * bs  # grid rows of the first query block before the first query
    pad = n_k * bs - Tk

    # Block-aligned copies: qg [B, Hkv, NQ, R, D] (R = G heads x bs rows, head-major),
    # kb [B, Hkv, NK, bs, D], vb [B, Hkv, NK, bs, Dv + 1] (last column: ones, see below).
    qp = q.new_zeros(B, H, n_q * bs, D)
    qp[:, :, lead : lead + Tq] = q
    qg = qp.view(B, Hkv, G, n_q, bs, D).transpose(2, 3).reshape(B, Hkv, n_q, R, D).to(acc) * scale
    kb = torch.nn.functional.pad(k.to(acc), (0, 0, 0, pad)).view(B, Hkv, n_k, bs, D)
    vb = torch.nn.functional.pad(v.to(acc), (0, 1, 0, pad), value=1.0).view(B, Hkv, n_k, bs, Dv + 1)
    valid = torch.zeros(B, n_k * bs, dtype=torch.bool, device=dev)
    valid[:, :Tk] = True if key_valid is None else key_valid.to(dev, torch.bool)
    # A grid row is a real query when it is a query of this call and its own token is real.
    real = valid.clone()
    real[:, : Tk - Tq] = False
    real = real.view(B, n_k, bs)[:, first:]  # [B, NQ, bs]
    thr = torch.full((B, n_q * bs), float("-inf"), dtype=acc, device=dev)
    thr[:, lead : lead + Tq] = torch.as_tensor(log_threshold, dtype=acc, device=dev).expand(B, Tq)
    thr = thr.clamp_max(0.0).view(B, n_q, bs)
    hist = shift = None
    if hist_bins is not None:
        hist = torch.zeros(B, hist_bins[2] + 1, dtype=torch.float64, device=dev)
        shift = torch.zeros(B, n_q * bs, dtype=acc, device=dev)
        if gap_shift is not None:
            shift[:, lead : lead + Tq] = gap_shift.to(dev, acc)
        shift = shift.view(B, n_q, bs)

    out = torch.empty(B, Hkv, n_q, R, Dv, dtype=acc, device=dev)
    lse = torch.empty(B, Hkv, n_q, R, dtype=acc, device=dev)
    skipped = torch.zeros(B, dtype=torch.int64, device=dev)
    for b in range(B):
        for h in range(Hkv):
            o_bh, lse_bh, skipped_bh = _group(
                qg[b, h], kb[b, h], vb[b, h], valid[b], real[b], thr[b], G, first, window,
                None if hist is None else (hist[b], shift[b], hist_bins),
            )
            out[b, h], lse[b, h] = o_bh, lse_bh
            skipped[b] += skipped_bh

    out = out.view(B, Hkv, n_q, G, bs, Dv).permute(0, 1, 3, 2, 4, 5).reshape(B, H, n_q * bs, Dv)
    lse = lse.view(B, Hkv, n_q, G, bs).permute(0, 1, 3, 2, 4).reshape(B, H, n_q * bs)
    # Every batch row counts (exact_cells without a padding mask counts one row).
    cells = H * exact_cells(Tq, Tk, window=window, key_valid=valid[:, :Tk])
    return SkipResult(
        out[:, :, lead : lead + Tq].to(q.dtype),
        lse[:, :, lead : lead + Tq],
        cells,
        int(skipped.sum()),
        skipped,
        hist,
    )


# Lazy rescaling (as in FlashAttention-4): the accumulators keep a reference maximum that is
# raised only when the true running maximum exceeds it by more than this (natural log units), so
# exponentials stay below e^8 and most steps rescale nothing. The skip rule always uses the true
# running maximum; the final normalisation cancels the reference exactly.
RESCALE_MARGIN = 8.0
# Gathering the kept tiles costs extra passes over the scores and accumulators on CPU; it pays
# only when at most this fraction of a step's tiles keeps the block.
COMPACT_BELOW = 0.5


def _group(qg, kb, vb, valid, real, thr, G, first, window, hist):
    """One (batch row, KV head): qg [NQ, R, D] scaled, kb [NK, bs, D], vb [NK, bs, Dv + 1].

    valid [NK * bs] real keys; real / thr [NQ, bs] per grid row; hist: (histogram [n + 1] to add
    into, shift [NQ, bs], (lo, step, n)) or None. Returns (out [NQ, R, Dv], lse [NQ, R], skipped).
    """
    n_q, R, _ = qg.shape
    n_k, bs, Dv1 = vb.shape
    dev, acc = qg.device, qg.dtype
    m = torch.full((n_q, R), float("-inf"), dtype=acc, device=dev)  # true running maximum
    ref = torch.full((n_q, R), float("-inf"), dtype=acc, device=dev)  # accumulators' reference
    # The value product against vb's column of ones accumulates the softmax denominator in the
    # same matmul, saving a pass over the scores.
    o = torch.zeros(n_q, R, Dv1, dtype=acc, device=dev)
    skipped = torch.zeros(n_q, R, dtype=torch.int64, device=dev)  # skipped cells per row
    thr_r = thr[:, None, :].expand(n_q, G, bs).reshape(n_q, R)
    row_off = torch.arange(bs, device=dev)
    tri = row_off[None, :] <= row_off[:, None]  # [bs, bs] causal tile of the diagonal block
    keys_in = valid.view(n_k, bs)
    has_key, full = keys_in.any(-1).tolist(), keys_in.all(-1).tolist()
    if hist is not None:  # per (row, key block): gap to the running maximum, and cells
        gaps = torch.full((n_q, R, n_k), float("nan"), dtype=acc, device=dev)
        cells = torch.zeros(n_q, bs, n_k, dtype=torch.int64, device=dev)

    for j in range(n_k):
        if not has_key[j]:
            continue
        # Query blocks (grid index) that see key block j: causal, and inside the window.
        lo, hi = max(j, first), first + n_q - 1
        if window is not None:
            hi = min(hi, j + (window + bs - 2) // bs)
        if lo > hi:
            continue
        a, e = lo - first, hi - first + 1  # local query-block range
        n = e - a
        s = torch.mm(qg[a:e].reshape(n * R, -1), kb[j].t()).view(n, G, bs, bs)  # scaled scores
        partial = window is not None or not full[j]
        if not partial:
            # Only the diagonal tile is partial: mask the keys after each query inside it.
            cnt = torch.full((n, 1, bs), bs, dtype=torch.int64, device=dev)
            if lo == j:
                s[0].masked_fill_(~tri, float("-inf"))
                cnt[0, 0] = row_off + 1
        else:
            q_pos = (torch.arange(lo, hi + 1, device=dev) * bs)[:, None] + row_off  # [n, bs]
            k_pos = j * bs + row_off  # [bs]
            diff = q_pos[:, :, None] - k_pos  # [n, bs, bs]
            ok = (diff >= 0) & valid[k_pos]
            if window is not None:
                ok &= diff < window
            s.masked_fill_(~ok[:, None], float("-inf"))
            cnt = ok.sum(-1)[:, None]  # [n, 1, bs]

        m_blk = s.amax(-1).view(n, R)
        m_old = m[a:e]
        gap = m_blk - m_old  # +inf on a row's first block: never skipped
        skip = gap < thr_r[a:e]
        if partial:
            skip &= m_blk > float("-inf")  # a row with no key here has nothing to skip
        skipped[a:e] += (skip.view(n, G, bs) * cnt).view(n, R)
        if hist is not None:
            gaps[a:e, :, j] = gap
            cells[a:e, :, j] = cnt[:, 0]
        torch.maximum(m_old, m_blk, out=m_old)  # skipped rows lie below it: unchanged
        active = ~skip & (m_old > float("-inf"))
        r_old = ref[a:e]
        grow = active & (m_old > r_old + RESCALE_MARGIN)  # includes a row's first block (-inf)
        o_rows = o[a:e].view(n * R, Dv1)
        if bool(grow.any()):
            rows = torch.nonzero(grow.view(-1)).squeeze(-1)
            r_new = m_old.view(-1)[rows]
            alpha = torch.exp(r_old.view(-1)[rows] - r_new)  # 0 on a row's first block (o is 0)
            o_rows[rows] = o_rows[rows] * alpha[:, None]
            r_old.view(-1)[rows] = r_new
        # Rows that skip (or see nothing) subtract +inf: their exponentials are exactly 0.
        sub = torch.where(active, r_old, float("inf")).view(n, G, bs, 1)
        items = active.view(n * G, bs).any(-1)  # tiles with a row that keeps the block
        n_items = int(items.sum())
        if n_items > COMPACT_BELOW * items.numel():
            # Most tiles keep the block: one dense pass, the skipping rows' exponentials are 0.
            p = s.sub_(sub).exp_()
            o_rows.addmm_(p.view(n * R, bs), vb[j])
        elif n_items:
            # Tiles where every row skips are dropped: no exponentials, no value product.
            idx = torch.nonzero(items).squeeze(-1)
            p = s.view(n * G, bs, bs)[idx].sub_(sub.view(n * G, bs, 1)[idx]).exp_()
            pv = torch.mm(p.view(-1, bs), vb[j]).view(-1, bs, Dv1)
            o[a:e].view(n * G, bs, Dv1)[idx] += pv

    real_r = real[:, None, :].expand(n_q, G, bs).reshape(n_q, R)
    if hist is not None:
        h, shift, (h_lo, h_step, h_n) = hist
        # Pairs a real row visited with at least one key; a row's first block has gap +inf.
        cells = cells[:, None].expand(n_q, G, bs, n_k).reshape(n_q, R, n_k)
        seen = real_r[..., None] & (cells > 0)
        g = gaps + shift[:, None, :].expand(n_q, G, bs).reshape(n_q, R, 1)
        # Uniform bins: bin = ceil((gap - lo) / step), clamped, as torch.bucketize would give.
        bins = torch.ceil((g[seen] - h_lo) / h_step).clamp_(0, h_n).long()
        h.index_add_(0, bins, cells[seen].to(torch.float64))
    l = o[..., Dv1 - 1]
    out = o[..., : Dv1 - 1] / l.clamp_min(torch.finfo(acc).tiny)[..., None]
    lse = torch.where(l > 0, ref + torch.log(l), float("-inf"))
    return out, lse, (skipped * real_r).sum()


def context_lengths(Tq: int, Tk: int, window: int | None, key_valid: torch.Tensor | None, batch: int, device):
    """[B, Tq] number of real keys each query may attend (its causal context, inside the window)."""
    kv = torch.ones(batch, Tk, dtype=torch.int64, device=device) if key_valid is None else key_valid.long()
    csum = torch.nn.functional.pad(kv.cumsum(-1), (1, 0))  # csum[:, j] = real keys in [0, j)
    pos = torch.arange(Tk - Tq, Tk, device=device)
    lo = (pos + 1 - window).clamp_min(0) if window is not None else torch.zeros_like(pos)
    return csum[:, pos + 1] - csum[:, lo]


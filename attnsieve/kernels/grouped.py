"""Exact attention of query rows over gathered groups of keys (buckets, clusters, samples).

Hashing and clustering methods do not attend key blocks of the position grid: a query attends
one or more *groups* of keys (an LSH bucket of the hash-sorted keys, a k-means cluster, a set of
random samples) whose members lie anywhere in the sequence. A call lists the groups as key
indices and the (row, group) *pairs* to compute; the kernel batches the pairs of one group into
tiles of `row_tile` rows, gathers the group's keys once per tile, runs a masked softmax (torch's
fused CPU flash-attention op where available, else matmul + softmax), and merges the partial
results of a row's pairs by log-sum-exp as it goes, so memory stays bounded by one chunk.

The pairs of one row must cover disjoint key sets (distinct clusters, or buckets with duplicates
excluded through `q_tags`/`k_tags`); masks are exact at token level (padding keys, causal order
and sliding window by absolute position, tag exclusion). No Tq x Tk tensor is ever allocated.
Returns (out, lse) and the number of query-key cells whose scores were computed inside the mask.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from attnsieve.kernels.block_sparse import _HAS_CPU_FLASH, DEFAULT_CHUNK_ELEMS
from attnsieve.kernels.dense import softmax_with_lse


@dataclass
class GroupedResult:
    out: torch.Tensor  # [N, R, Dv]
    lse: torch.Tensor  # [N, R]
    cells: int  # (row, key) cells computed inside the mask, summed over all pairs


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pair_row: torch.Tensor,
    pair_group: torch.Tensor,
    group_keys: torch.Tensor,
    *,
    scale: float | None = None,
    key_ok: torch.Tensor | None = None,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    causal: bool = False,
    window: int | None = None,
    q_tags: torch.Tensor | None = None,
    k_tags: torch.Tensor | None = None,
    row_tile: int = 32,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    fused: bool | None = None,
    unique_rows: bool | None = None,
) -> GroupedResult:
    """Attention of each listed (row, group) pair, merged per row by log-sum-exp.

    q: [N, R, D] query rows of N independent items; k: [N, K, D]; v: [N, K, Dv].
    group_keys: [N, G, S] key indices in [0, K) of each group, -1 for an empty slot.
    pair_row: [P] flat row index n * R + r; pair_group: [P] flat group index n * G + g of the
    same item n. Rows with no pair get out = 0 and lse = -inf.
    key_ok: [N, K] bool, False keys are never attended (padding).
    q_pos: [N, R], k_pos: [N, K] absolute positions, needed for `causal` (key <= query) and
    `window` (query - key < window).
    q_tags: [N, R, T], k_tags: [N, K, T] integer tags; a key whose tag t equals the row's tag t
    for any t is excluded (e.g. keys already seen by the row in an earlier hash round).
    unique_rows: True when the caller knows no row has two pairs (None: checked, a host read).
    Host reads: one to plan the tiles, one for the cell count (and one for `unique_rows=None`).
    """
    N, R, D = q.shape
    K, Dv = k.shape[1], v.shape[-1]
    G, S = group_keys.shape[1], group_keys.shape[2]
    if k.shape[0] != N or v.shape[:2] != k.shape[:2] or group_keys.shape[0] != N:
        raise ValueError(
            f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"group_keys {tuple(group_keys.shape)}"
        )
    if pair_row.shape != pair_group.shape:
        raise ValueError(f"pair_row {tuple(pair_row.shape)} and pair_group {tuple(pair_group.shape)} differ")
    if (causal or window is not None) and (q_pos is None or k_pos is None):
        raise ValueError("causal or windowed grouped attention needs q_pos and k_pos")
    if (q_tags is None) != (k_tags is None):
        raise ValueError("q_tags and k_tags go together")
    if row_tile < 1:
        raise ValueError(f"row_tile must be >= 1, got {row_tile}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    dev = q.device
    if fused is None:
        fused = dev.type == "cpu" and acc in (torch.float32, torch.float64) and _HAS_CPU_FLASH

    # Valid slots first in every group, so a batch of tiles can cut all groups to one length.
    gk = torch.where(group_keys >= 0, group_keys, K).sort(dim=-1).values
    group_len = (gk < K).sum(-1).reshape(-1)  # [N*G]
    gk = torch.where(gk < K, gk, -1).reshape(N * G, S)

    # Running per-row state, with one extra dump row that absorbs the padding rows of tiles.
    m = torch.full((N * R + 1,), float("-inf"), dtype=acc, device=dev)  # running max of pair lse
    ssum = torch.zeros(N * R + 1, dtype=acc, device=dev)
    accum = torch.zeros(N * R + 1, Dv, dtype=acc, device=dev)
    cells = torch.zeros((), dtype=torch.int64, device=dev)

    # Pairs whose group has no key compute nothing: their tiles have length 0 and are skipped below
    # (filtering them out here would read the device for the new pair count).
    one_pair_per_row = unique_rows if unique_rows is not None else pair_row.numel() == torch.unique(pair_row).numel()
    if pair_row.numel():
        order = torch.argsort(pair_group, stable=True)
        pr, pg = pair_row[order], pair_group[order]
        counts = torch.zeros(N * G, dtype=torch.long, device=dev).scatter_add_(0, pg, torch.ones_like(pg))
        n_tiles = (counts + row_tile - 1) // row_tile  # tiles per group
        # One host read plans every tile: the tile count and each tile's key length, ascending (the same
        # stable order as `by_len` below), from the groups' pair counts and lengths.
        host_tiles, host_len = torch.stack([n_tiles, group_len]).tolist()
        lens = sorted(length for length, t in zip(host_len, host_tiles, strict=True) for _ in range(t))
        n_all = len(lens)
        tile_start = torch.cumsum(n_tiles, 0) - n_tiles  # first tile of each group
        pos = torch.arange(pr.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[pg]  # rank in group
        tile_id = tile_start[pg] + pos // row_tile
        tile_rows = torch.full((n_all, row_tile), N * R, dtype=torch.long, device=dev)  # N * R: dump row
        tile_rows[tile_id, pos % row_tile] = pr
        tile_group = torch.empty(n_all, dtype=torch.long, device=dev)
        tile_group[tile_id] = pg
        by_len = torch.argsort(group_len[tile_group], stable=True)  # short groups first
        tile_group, tile_rows = tile_group[by_len], tile_rows[by_len]

        q_flat = q.reshape(N * R, D)
        k_flat, v_flat = k.reshape(N * K, D), v.reshape(N * K, Dv)
        n_tags = 0 if q_tags is None else q_tags.shape[-1]

        def tile_elems(s_len: int) -> int:  # scores and masks, gathered keys/values, query rows
            return row_tile * s_len * (4 + n_tags) + s_len * (D + Dv) + row_tile * (D + Dv)

        start = bisect.bisect_right(lens, 0)  # tiles of empty groups (first: lens ascend) compute nothing
        zero, ninf = torch.zeros((), dtype=acc, device=dev), torch.full((), float("-inf"), dtype=acc, device=dev)
        while start < n_all:
            lo, hi = start + 1, n_all  # largest stop whose tiles fit in chunk_elems (lens ascending)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if (mid - start) * tile_elems(lens[mid - 1]) <= chunk_elems:
                    lo = mid
                else:
                    hi = mid - 1
            stop = lo
            s_b = lens[stop - 1]
            tg, rows = tile_group[start:stop], tile_rows[start:stop]  # [t], [t, C]
            t = stop - start
            n_i = tg // G
            keys = gk.index_select(0, tg)[:, :s_b]  # [t, Sb]
            slot_ok = keys >= 0
            kidx = (n_i[:, None] * K + keys.clamp_min(0)).reshape(-1)
            row_ok = rows < N * R
            ridx = rows.clamp_max(N * R - 1).reshape(-1)
            allowed = slot_ok[:, None, :] & row_ok[:, :, None]  # [t, C, Sb]
            if key_ok is not None:
                allowed &= key_ok.reshape(-1).index_select(0, kidx).view(t, 1, s_b)
            if causal or window is not None:
                diff = (q_pos.reshape(-1).index_select(0, ridx).view(t, row_tile, 1)
                        - k_pos.reshape(-1).index_select(0, kidx).view(t, 1, s_b))
                if causal:
                    allowed &= diff >= 0
                if window is not None:
                    allowed &= diff < window
            if q_tags is not None:
                qt = q_tags.reshape(N * R, -1).index_select(0, ridx).view(t, row_tile, 1, -1)
                kt = k_tags.reshape(N * K, -1).index_select(0, kidx).view(t, 1, s_b, -1)
                allowed &= ~(qt == kt).any(-1)
            cells += allowed.sum()
            qi = q_flat.index_select(0, ridx).view(t, row_tile, D).to(acc)
            kg = k_flat.index_select(0, kidx).view(t, s_b, D).to(acc)
            vg = v_flat.index_select(0, kidx).view(t, s_b, Dv).to(acc)
            empty = ~allowed.any(-1)  # [t, C]
            if fused:
                bias = torch.where(allowed, zero, ninf)[:, None]
                o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    qi[:, None], kg[:, None], vg[:, None], 0.0, False, attn_mask=bias, scale=scale
                )
                o, l = o[:, 0], l[:, 0]
            else:
                scores = torch.bmm(qi, kg.transpose(1, 2)).mul_(scale).masked_fill_(~allowed, float("-inf"))
                o, l = softmax_with_lse(scores, vg)
            # Rows that saw no key keep their state: send them to the dump row as well.
            dest = torch.where(row_ok & ~empty, rows, N * R).reshape(-1)
            l, o = l.reshape(-1).to(acc), o.reshape(-1, Dv).to(acc)
            if one_pair_per_row:  # each row's only partial result: write it
                m.index_copy_(0, dest, l)
                ssum.index_fill_(0, dest, 1.0)
                accum.index_copy_(0, dest, o)
            else:
                _accumulate(m, ssum, accum, dest, l, o)
            start = stop

    m, ssum, accum = m[:-1], ssum[:-1], accum[:-1]
    if not one_pair_per_row:  # rows never written stay 0 with lse -inf
        accum.div_(ssum.clamp_min(torch.finfo(acc).tiny)[:, None])
        m = m + torch.log(ssum)
    return GroupedResult(accum.view(N, R, Dv).to(q.dtype), m.view(N, R), int(cells))


def _accumulate(m, ssum, accum, rows, lse, out):
    """Online log-sum-exp merge of pair results (rows may repeat) into the running row state."""
    if rows.numel() == 0:
        return
    uniq, inv = torch.unique(rows, return_inverse=True)
    batch_max = torch.full((uniq.numel(),), float("-inf"), dtype=m.dtype, device=m.device)
    batch_max.scatter_reduce_(0, inv, lse.to(m.dtype), reduce="amax")
    old = m[uniq]
    new = torch.maximum(old, batch_max)
    safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
    f_old = torch.exp(old - safe)  # 0 where nothing was accumulated yet
    w = torch.exp(lse.to(m.dtype) - safe[inv])  # [M]
    acc_u = accum[uniq] * f_old[:, None]
    acc_u.index_add_(0, inv, out.to(m.dtype) * w[:, None])
    s_u = ssum[uniq] * f_old
    s_u.index_add_(0, inv, w)
    accum[uniq], ssum[uniq], m[uniq] = acc_u, s_u, new

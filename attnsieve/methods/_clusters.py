"""Shared machinery of the clustering methods (squeezed, centroid): a chunked, leak-free k-means index.

Clustering all keys at once makes the clusters a query sees depend on later keys (k-means moves
its centroids), a causal leak. Instead the sequence is cut into chunks of `chunk` positions, the
keys of each chunk are clustered on their own (RetroInfer's segmented clustering), and query
chunk j uses only the clusters of chunks before j; its own chunk's keys (those at or before the
query) run exact causal attention, and a few sink tokens (the first real keys) are always exact.
So every cluster a query sees is made of earlier keys only, fitted from them alone. The k-means
of all chunks runs as one batched call, costing about (chunk / Tk) / 4 of dense attention per
iteration and query head group.

A method subclasses ClusterMethod and implements `select`: from the scores of a query chunk
against the centroids of the earlier chunks, which clusters it attends exactly (retrieval) and
which it only estimates from their centroid (estimation). The base class executes the exact
parts on the kernels (block-diagonal chunks, sinks, gathered clusters), adds the centroid
estimate, merges all of them by log-sum-exp (the key sets are disjoint) and counts the cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnsieve.kernels import merge
from attnsieve.kernels.grouped import grouped_attention
from attnsieve.methods._hashing import ALIGN, diagonal_attention
from attnsieve.methods.base import AttnOutput, Method, estimate_clock
from attnsieve.methods.window import first_real_positions


@dataclass
class ClusterIndex:
    """Clusters of every chunk, flattened per item n = (batch row, KV head): cluster id = chunk * K + c."""

    chunk: int
    n_chunks: int
    per_chunk: int  # K clusters per chunk
    centroid: torch.Tensor  # [N, NC * K, D] mean of the cluster's raw keys
    count: torch.Tensor  # [N, NC * K] keys in the cluster (0: empty)
    value_mean: torch.Tensor  # [N, NC * K, Dv]
    min_pos: torch.Tensor  # [N, NC * K] first and last key position (window checks)
    max_pos: torch.Tensor
    group_keys: torch.Tensor  # [N, NC * K, S] key positions of each cluster, -1 padded


def chunk_length(Tk: int, chunk_size: int | None, density: float | None) -> int:
    """The chunk (segment) length: given, or Tk / 16 (RetroInfer's 8k segments at 128k), kept small
    enough under `density` that the exact own-chunk part stays below half of the target."""
    if chunk_size is not None:
        return chunk_size
    c = Tk / 16
    if density is not None:
        c = min(c, density * Tk / 2)
    return int(min(max(round(c / ALIGN) * ALIGN, 64), 8192))


def spherical_kmeans(x: torch.Tensor, valid: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """Batched k-means on unit-normalised rows (cosine), seeded by evenly spaced valid rows.

    x: [M, c, D]; valid: [M, c]. Returns labels [M, c] in [0, k), -1 for invalid rows.
    """
    M, c, D = x.shape
    xn = F.normalize(x.float(), dim=-1) * valid[..., None]
    n_valid = valid.sum(-1)  # [M]
    cum = valid.long().cumsum(-1)
    target = ((torch.arange(k, device=x.device) + 0.5) * n_valid[:, None] / k).floor().long()  # ranks
    seed = torch.searchsorted(cum, target + 1).clamp_max(c - 1)
    cent = torch.gather(xn, 1, seed[..., None].expand(M, k, D))
    for _ in range(iters):
        lab = (xn @ cent.transpose(1, 2)).argmax(-1)  # [M, c]
        sums = torch.zeros(M, k, D, device=x.device).scatter_add_(1, lab[..., None].expand(M, c, D), xn)
        cnt = torch.zeros(M, k, device=x.device).scatter_add_(1, lab, valid.float())
        cent = torch.where(cnt[..., None] > 0, F.normalize(sums, dim=-1), cent)
    lab = (xn @ cent.transpose(1, 2)).argmax(-1)
    return lab.masked_fill(~valid, -1)


def build_index(k, v, clusterable, chunk: int, per_chunk: int, iters: int) -> ClusterIndex:
    """Cluster every chunk's keys; clusterable: [B, Tk] bool (real keys that are not sinks)."""
    B, Hkv, Tk, D = k.shape
    Dv = v.shape[-1]
    NC = -(-Tk // chunk)
    Pd, N, K = NC * chunk, B * Hkv, per_chunk
    dev = k.device
    kp = F.pad(k.float(), (0, 0, 0, Pd - Tk))
    vp = F.pad(v.float(), (0, 0, 0, Pd - Tk))
    ok = F.pad(clusterable, (0, Pd - Tk)).view(B, 1, NC, chunk).expand(B, Hkv, NC, chunk)
    lab = spherical_kmeans(kp.view(N * NC, chunk, D), ok.reshape(N * NC, chunk), K, iters)
    chunk_of = torch.arange(NC, device=dev).repeat_interleave(chunk)  # [Pd]
    gid = torch.where(lab.view(N, Pd) >= 0, lab.view(N, Pd) + chunk_of * K, -1)  # [N, Pd]
    G = NC * K
    safe = gid.clamp_min(0)
    w = (gid >= 0).float()
    count = torch.zeros(N, G, device=dev).scatter_add_(1, safe, w)
    ksum = torch.zeros(N, G, D, device=dev).scatter_add_(
        1, safe[..., None].expand(N, Pd, D), kp.view(N, Pd, D) * w[..., None])
    vsum = torch.zeros(N, G, Dv, device=dev).scatter_add_(
        1, safe[..., None].expand(N, Pd, Dv), vp.view(N, Pd, Dv) * w[..., None])
    denom = count.clamp_min(1)[..., None]
    pos = torch.arange(Pd, device=dev).expand(N, Pd)
    min_pos = torch.full((N, G), Pd, dtype=torch.long, device=dev).scatter_reduce_(
        1, safe, torch.where(gid >= 0, pos, Pd), reduce="amin")
    max_pos = torch.full((N, G), -1, dtype=torch.long, device=dev).scatter_reduce_(
        1, safe, torch.where(gid >= 0, pos, -1), reduce="amax")

    # Key positions grouped by cluster: sort by cluster id, rank inside the cluster = slot.
    sgid, order = torch.where(gid >= 0, gid, G).sort(dim=-1, stable=True)
    counts = count.long()
    offsets = torch.cat([counts.cumsum(-1) - counts, counts.sum(-1, keepdim=True)], -1)  # [N, G + 1]
    slot = torch.arange(Pd, device=dev) - torch.gather(offsets, 1, sgid)
    S = max(1, int(counts.max()))
    group_keys = torch.full((N, G + 1, S), -1, dtype=torch.long, device=dev)
    live = sgid < G
    n_idx = torch.arange(N, device=dev)[:, None].expand(N, Pd)
    group_keys[n_idx[live], sgid[live], slot[live]] = order[live]
    return ClusterIndex(chunk, NC, K, ksum / denom, count, vsum / denom, min_pos, max_pos, group_keys[:, :G])


def chunk_fractions(density, Tq, Tk, chunk, key_valid, window, sink_pos, B, device) -> torch.Tensor:
    """[B, NC] fraction of each query chunk's clustered keys to attend exactly so that the chunk's
    cells (own chunk + sinks + kept keys) are `density` of its exact cells; from shapes and padding."""
    real = torch.ones(B, Tk, dtype=torch.bool, device=device) if key_valid is None else key_valid.to(device)
    csum = F.pad(real.long().cumsum(-1), (1, 0))  # csum[:, j] = real keys before j
    qpos = torch.arange(Tk - Tq, Tk, device=device)
    lo = (qpos + 1 - window).clamp_min(0) if window is not None else torch.zeros_like(qpos)
    start = (qpos // chunk) * chunk
    visible = csum[:, qpos + 1] - csum[:, lo]
    local = csum[:, qpos + 1] - csum[:, torch.maximum(lo, start)]
    sp = sink_pos[:, None, :]  # [B, 1, S]
    sinks = ((sp >= 0) & (sp < start[None, :, None]) & (sp >= lo[None, :, None])).sum(-1)
    rows = real[:, Tk - Tq :].long()
    NC = -(-Tk // chunk)
    idx = (qpos // chunk).expand(B, -1)

    def per_chunk(x):
        return torch.zeros(B, NC, dtype=torch.float64, device=device).scatter_add_(1, idx, (x * rows).double())

    E, L, Sk = per_chunk(visible), per_chunk(local), per_chunk(sinks)
    C = E - L - Sk
    return torch.where(C > 0, ((density * E - L - Sk) / C.clamp_min(1)).clamp(0, 1), torch.ones_like(C))


class ClusterMethod(Method):
    """Chunked cluster index + exact own chunk + sinks; subclasses choose clusters in `select`."""

    def chunk_and_clusters(self, Tk: int) -> tuple[int, int]:
        raise NotImplementedError

    def select(self, scores, count, vis_ret, vis_est, frac, calib) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Retrieval and estimation masks [N, G, cj, V] for one query chunk.

        scores: [N, G, cj, V] scaled q . centroid; count: [N, V]; vis_ret / vis_est: [N, G, cj, V]
        clusters a query may attend exactly / estimate; frac: [N] fraction of clustered keys to
        retrieve (None: the method's own budget); calib: (scores [N, G, nc, V], rows_ok [N, nc]) of
        the `observation_window` queries before the chunk, or None.
        """
        raise NotImplementedError

    observation_window = 0  # queries before a chunk passed to `select` for calibration

    def prefill(self, q, k, v, ctx):
        p = self.params
        B, H, Tq, D = q.shape
        Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
        G, N, first, dev = H // Hkv, B * Hkv, Tk - Tq, q.device
        t0 = estimate_clock(q)
        chunk, per_chunk = self.chunk_and_clusters(Tk)
        sink_pos = first_real_positions(ctx.key_valid, B, Tk, p.sink, dev)  # [B, S]
        real = torch.ones(B, Tk, dtype=torch.bool, device=dev) if ctx.key_valid is None else ctx.key_valid.to(dev)
        clusterable = real.clone()
        bi = torch.arange(B, device=dev)[:, None].expand_as(sink_pos)
        clusterable[bi[sink_pos >= 0], sink_pos[sink_pos >= 0]] = False
        NC = -(-Tk // chunk)
        index = build_index(k, v, clusterable, chunk, per_chunk, p.kmeans_iters) if NC > 1 else None
        frac = None
        if p.density is not None and NC > 1:
            frac = chunk_fractions(p.density, Tq, Tk, chunk, ctx.key_valid, ctx.window, sink_pos, B, dev)
            frac = frac.repeat_interleave(Hkv, 0)  # [N, NC]
        estimate_s = estimate_clock(q) - t0

        local = diagonal_attention(q, k, v, chunk, scale=ctx.scale, key_valid=ctx.key_valid, window=ctx.window)
        out, lse, cells = local.out.clone(), local.lse.clone(), local.cells
        R = G * Tq
        q_rows = q.reshape(N, R, D)  # head-major rows of each (batch row, KV head)
        k_n, v_n = k.reshape(N, Tk, D), v.reshape(N, Tk, Dv)
        key_ok = real.repeat_interleave(Hkv, 0)  # [N, Tk]
        k_pos = torch.arange(Tk, device=dev).expand(N, Tk)
        qpos = torch.arange(first, Tk, device=dev)
        q_pos = qpos.repeat(G).expand(N, R)
        row_ok = real[:, first:].repeat_interleave(Hkv, 0).repeat(1, G)  # [N, R]

        if p.sink > 0 and NC > 1:  # sinks before the query's own chunk (inside it they are local)
            sinks = sink_pos.repeat_interleave(Hkv, 0)[:, None, :]  # [N, 1, S]
            rows = torch.nonzero(row_ok.reshape(-1)).squeeze(-1)
            res = grouped_attention(
                q_rows, k_n, v_n, rows, rows // R, sinks, scale=ctx.scale, key_ok=key_ok, q_pos=q_pos, k_pos=k_pos,
                causal=True, window=ctx.window, q_tags=(q_pos // chunk)[..., None], k_tags=(k_pos // chunk)[..., None],
            )
            o, l = self._heads(res.out, B, H, Tq), self._heads(res.lse, B, H, Tq)
            out, lse = merge(out, lse, o, l)
            cells += res.cells
        if index is None:
            return AttnOutput(out, cells, estimate_s, lse)

        qg = q.reshape(N, G, Tq, D)
        out_g, lse_g = out.view(N, G, Tq, Dv), lse.view(N, G, Tq)
        rows_real = real[:, first:].repeat_interleave(Hkv, 0)  # [N, Tq]
        K, V_all = index.per_chunk, index.n_chunks * index.per_chunk
        log_count = torch.log(index.count)  # -inf for empty clusters
        for j in range(1, NC):
            i0, i1 = max(j * chunk, first) - first, min((j + 1) * chunk, Tk) - first
            if i1 <= i0:
                continue
            t0 = estimate_clock(q)
            V, cj = j * K, i1 - i0
            qc = qg[:, :, i0:i1].float()  # [N, G, cj, D]
            scores = (qc @ index.centroid[:, None, :V].transpose(-1, -2)) * ctx.scale  # [N, G, cj, V]
            nonempty = (index.count[:, :V] > 0)[:, None, None, :]
            vis_ret, vis_est = nonempty, nonempty
            if ctx.window is not None:
                edge = (qpos[i0:i1] - ctx.window)[None, None, :, None]  # keys at or before it are out
                vis_ret = vis_ret & (index.max_pos[:, None, None, :V] > edge)
                vis_est = vis_est & (index.min_pos[:, None, None, :V] > edge)
            row_here = rows_real[:, None, i0:i1, None]
            vis_ret = (vis_ret & row_here).expand(N, G, cj, V)
            vis_est = (vis_est & row_here).expand(N, G, cj, V)
            calib = None
            if self.observation_window:
                c0 = max(j * chunk - self.observation_window, first) - first
                c1 = j * chunk - first
                if c1 > c0:
                    cal = (qg[:, :, c0:c1].float() @ index.centroid[:, None, :V].transpose(-1, -2)) * ctx.scale
                    calib = (cal, rows_real[:, c0:c1])
            ret, est = self.select(scores, index.count[:, :V], vis_ret, vis_est,
                                   None if frac is None else frac[:, j], calib)
            ret = ret & vis_ret
            nz = torch.nonzero(ret)  # [P, 4]: n, g, i, cluster
            estimate_s += estimate_clock(q) - t0

            pair_row = nz[:, 0] * (G * cj) + nz[:, 1] * cj + nz[:, 2]
            pair_group = nz[:, 0] * V_all + nz[:, 3]
            res = grouped_attention(
                qc.reshape(N, G * cj, D).to(q.dtype), k_n, v_n, pair_row, pair_group, index.group_keys,
                scale=ctx.scale, key_ok=key_ok, q_pos=qpos[i0:i1].repeat(G).expand(N, G * cj), k_pos=k_pos,
                window=ctx.window,
            )
            cells += res.cells
            o, l = res.out.view(N, G, cj, Dv), res.lse.view(N, G, cj)
            if est is not None:
                est = est & vis_est & ~ret
                le = torch.where(est, scores + log_count[:, None, None, :V], float("-inf"))
                lse_e = torch.logsumexp(le, -1)  # [N, G, cj]
                wts = torch.exp(le - torch.where(torch.isfinite(lse_e), lse_e, 0)[..., None])
                o_e = wts @ index.value_mean[:, None, :V]  # each cluster: n * e^{q.c} with mean value
                o, l = merge(o, l, o_e.to(o.dtype), lse_e.to(l.dtype))
            mo, ml = merge(out_g[:, :, i0:i1], lse_g[:, :, i0:i1], o.to(out.dtype), l.to(lse.dtype))
            out_g[:, :, i0:i1], lse_g[:, :, i0:i1] = mo, ml
        return AttnOutput(out, cells, estimate_s, lse)

    @staticmethod
    def _heads(x, B, H, Tq):
        """Item rows [N, G * Tq, ...] back to [B, H, Tq, ...]."""
        return x.reshape(B, H, Tq, *x.shape[2:])

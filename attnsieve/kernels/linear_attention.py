"""Causal (optionally windowed) attention with a feature-map kernel, in chunks: never a Tq x Tk tensor.

With features phi(q) . phi(k) in place of exp(q . k), query i's output is
sum_{j <= i} phi(q_i) . phi(k_j) v_j / sum_{j <= i} phi(q_i) . phi(k_j). The chunked form (as in
Lightning Attention, Qin et al., arXiv:2401.04658, and flash-linear-attention's chunk kernels)
splits the keys into chunks of C tokens: keys of earlier chunks reach a query through a running
state S = sum_j phi(k_j) v_j^T (plus its normaliser z = sum_j phi(k_j)), keys of the query's own
chunk through exact masked products phi(q_i) . phi(k_j). Cost O(T * C * M + T * M * Dv).

Features arrive as (f, log_shift) pairs (see feature_maps.py): phi(x) = f * exp(log_shift). Every
state carries the largest key shift it holds and each query row rescales against the largest
shift among the keys it sees, so exponential features stay finite and no key's shift depends on a
later key. A per-key log weight also expresses decay: gamma^(i - j) = exp(i log gamma) exp(-j log
gamma) goes into the query and key shifts (a key shift per query head, `lk` of shape [B, H, Tk]).

A sliding window (query i sees keys i - window < j <= i) keeps one state per chunk: chunks wholly
inside every query's window are summed from their states, the (at most two) chunks cut by the
window edge are computed as exact masked products. Padding keys (key_valid False) never count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class FeatureResult:
    out: torch.Tensor  # [B, H, Tq, Dv] normalised output (0 where the normaliser is 0)
    lse: torch.Tensor  # [B, H, Tq] log of the positive normaliser covered (-inf where none)
    cells: int  # query-key cells whose products were computed one by one (real queries and keys)
    covered: torch.Tensor | None = None  # [B, H, Tq] keys each row covered (support kernel only)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _merge_states(states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], like):
    """Sum (S, z, M) states kept at different shifts M into one at the largest shift."""
    S0, z0, M0 = like
    if not states:
        return torch.zeros_like(S0), torch.zeros_like(z0), torch.full_like(M0, NEG_INF)
    Ms = torch.stack([m for _, _, m in states])  # [n, B, Hkv, Gl]
    M = Ms.amax(0)
    w = torch.exp(Ms - _finite_or_zero(M))  # 0 for empty states (M = -inf)
    S = sum(w[i][..., None, None] * s for i, (s, _, _) in enumerate(states))
    z = sum(w[i][..., None] * zz for i, (_, zz, _) in enumerate(states))
    return S, z, M


def causal_feature_attention(
    fq: torch.Tensor,
    lq: torch.Tensor,
    fk: torch.Tensor,
    lk: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    key_valid: torch.Tensor | None = None,
    chunk: int = 64,
    skip_own_chunk: bool = False,
) -> FeatureResult:
    """Causal feature-map attention in chunks of `chunk` tokens on the absolute position grid.

    fq: [B, H, Tq, M] query features, lq: [B, H, Tq] their log shifts; fk: [B, Hkv, Tk, M] key
    features, lk: [B, Hkv, Tk] (or [B, H, Tk] for per-head decay) their log shifts; v: [B, Hkv, Tk, Dv].
    Query i sits at absolute position Tk - Tq + i. `skip_own_chunk` leaves out the keys of the
    query's own chunk (Scatterbrain computes that block exactly instead). `cells` counts the
    products computed one by one (own chunk and window edges).
    """
    B, H, Tq, Fd = fq.shape
    Hkv, Tk, Dv = fk.shape[1], fk.shape[2], v.shape[-1]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if lk.shape[1] not in (Hkv, H):
        raise ValueError(f"key log shifts must have {Hkv} or {H} heads, got shape {tuple(lk.shape)}")
    if Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 token, got {window}")
    G, Gl = H // Hkv, lk.shape[1] // Hkv
    acc = torch.float32 if fq.dtype in (torch.float16, torch.bfloat16) else fq.dtype
    dev = fq.device
    fq = fq.to(acc).reshape(B, Hkv, G, Tq, Fd)
    lq = lq.to(acc).reshape(B, Hkv, G, Tq)
    fk = fk.to(acc)[:, :, None]  # [B, Hkv, 1, Tk, M]
    vv = v.to(acc)[:, :, None]  # [B, Hkv, 1, Tk, Dv]
    lk = lk.to(acc).reshape(B, Hkv, Gl, Tk)
    kv = None if key_valid is None else key_valid.to(dev, torch.bool)
    if kv is not None:  # padding keys: weight 0, and no NaN from their features or values
        lk = lk.masked_fill(~kv[:, None, None], NEG_INF)
        fk = fk.masked_fill(~kv[:, None, None, :, None], 0.0)
        vv = vv.masked_fill(~kv[:, None, None, :, None], 0.0)
    w = Tk + 1 if window is None else window
    off = Tk - Tq
    C = chunk
    n_chunks = -(-Tk // C)
    # Query rows: with key shifts shared by a KV group (Gl = 1) its G heads are folded into the
    # rows, position-major ([B, Hkv, 1, Tq * G, M]), so each chunk is one contiguous slice.
    Rf = G if Gl == 1 else 1
    if Rf > 1:
        fq = fq.transpose(2, 3).reshape(B, Hkv, 1, Tq * G, Fd)
        lq = lq.transpose(2, 3).reshape(B, Hkv, 1, Tq * G)

    out = torch.zeros(B, Hkv, Gl, Tq * Rf, Dv, dtype=acc, device=dev)
    lse = torch.full((B, Hkv, Gl, Tq * Rf), NEG_INF, dtype=acc, device=dev)
    S = torch.zeros(B, Hkv, Gl, Fd, Dv, dtype=acc, device=dev)  # running state (no window)
    z = torch.zeros(B, Hkv, Gl, Fd, dtype=acc, device=dev)
    M = torch.full((B, Hkv, Gl), NEG_INF, dtype=acc, device=dev)
    ring: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # per-chunk states (window)
    # counted on the device and read once at the end (a read per chunk would stall a GPU per chunk)
    cells = torch.zeros((), dtype=torch.int64, device=dev)
    folded = False  # whether the running state holds any chunk yet (known on the host)
    for c in range(n_chunks):
        k0, k1 = c * C, min((c + 1) * C, Tk)
        if k1 > off:  # the chunk holds queries
            p0, p1 = max(k0, off), k1  # absolute positions of its queries
            # chunks [f_lo, c) lie inside every query's window; [e0, f_lo * C) is cut by its edge
            f_lo = min(c, max(0, -(-(p1 - w) // C)))
            e0 = min(max(0, p0 - w + 1), f_lo * C)
            spans = [(a, b) for a, b in [(e0, f_lo * C), (k0, k1)][: 1 if skip_own_chunk else 2] if b > a]
            if len(spans) == 2 and spans[0][1] == spans[1][0]:
                spans = [(spans[0][0], spans[1][1])]

            def keys(x, spans=spans):  # the explicit keys of x along its token axis (-2 or -1)
                ax = x.dim() - 2 if x.dim() == 5 else x.dim() - 1
                parts = [x.narrow(ax, a, b - a) for a, b in spans]
                return parts[0] if len(parts) == 1 else torch.cat(parts, ax) if parts else x.narrow(ax, 0, 0)

            kpos = torch.cat([torch.arange(a, b, device=dev) for a, b in spans] or [torch.arange(0, device=dev)])
            qpos = torch.arange(p0, p1, device=dev)
            mask = (kpos[None, :] <= qpos[:, None]) & (qpos[:, None] - kpos[None, :] < w)  # [nq, Ne]
            if window is None:
                Sf, zf, Mf = S, z, M
            else:
                for j in [j for j in ring if j < f_lo]:
                    del ring[j]  # later chunks' windows start no earlier
                Sf, zf, Mf = _merge_states([ring[j] for j in range(f_lo, c)], (S, z, M))

            r0, r1 = (p0 - off) * Rf, (p1 - off) * Rf
            qc, lqc = fq[:, :, :, r0:r1], lq[:, :, :, r0:r1]  # [B, Hkv, Gl, R, M], R = nq * Rf
            mask_r = mask.repeat_interleave(Rf, dim=0) if Rf > 1 else mask  # [R, Ne]
            le = keys(lk)[:, :, :, None, :].masked_fill(~mask_r, NEG_INF)  # [B, Hkv, Gl, R, Ne]
            row_max = le.amax(-1) if le.shape[-1] else le.new_full(le.shape[:-1], NEG_INF)
            Z = torch.maximum(row_max, Mf[..., None])  # [B, Hkv, Gl, R] row reference shift
            Zs = _finite_or_zero(Z)
            A = (qc @ keys(fk).transpose(-1, -2)).mul_(torch.exp(le - Zs[..., None]))  # [B, Hkv, Gl, R, Ne]
            num = A @ keys(vv)  # [B, Hkv, Gl, R, Dv]
            den = A.sum(-1)
            if (folded if window is None else any(j in ring for j in range(f_lo, c))):
                sf = torch.exp(Mf[..., None] - Zs)  # [B, Hkv, Gl, R]; 0 where the state is empty
                num.add_((qc @ Sf).mul_(sf[..., None]))
                den.add_((qc @ zf[..., None])[..., 0].mul_(sf))
            ok = den > 0
            out[:, :, :, r0:r1] = torch.where(ok[..., None], num / torch.where(ok, den, 1.0)[..., None], 0.0)
            lse[:, :, :, r0:r1] = torch.where(ok, torch.log(torch.where(ok, den, 1.0)) + lqc + Zs, NEG_INF)
            if kv is None:
                cells += B * H * mask.sum()
            else:
                real = mask[None] & kv[:, kpos][:, None, :] & kv[:, p0:p1, None]
                cells += H * real.sum()

        if c == n_chunks - 1 or (window is not None and k1 - 1 < off - w + 1):
            continue  # no later query sees these keys through a state
        lc = lk[..., k0:k1]  # [B, Hkv, Gl, Ck]
        if window is None:  # fold the chunk into the running state at the new largest shift
            Mn = torch.maximum(M, lc.amax(-1))
            Ms = _finite_or_zero(Mn)
            decay = torch.exp(M - Ms)  # 0 while the state is empty
            fw = fk[:, :, :, k0:k1] * torch.exp(lc - Ms[..., None])[..., None]  # [B, Hkv, Gl, Ck, M]
            S.mul_(decay[..., None, None]).add_(fw.transpose(-1, -2) @ vv[:, :, :, k0:k1])
            z.mul_(decay[..., None]).add_(fw.sum(-2))
            M = Mn
            folded = True
        else:
            Mc = lc.amax(-1)
            fw = fk[:, :, :, k0:k1] * torch.exp(lc - _finite_or_zero(Mc)[..., None])[..., None]
            ring[c] = (fw.transpose(-1, -2) @ vv[:, :, :, k0:k1], fw.sum(-2), Mc)  # [.., M, Dv], [.., M], [..]

    if Rf > 1:  # rows back to head-major
        out = out.view(B, Hkv, Tq, G, Dv).transpose(2, 3)
        lse = lse.view(B, Hkv, Tq, G).transpose(2, 3)
    return FeatureResult(out.reshape(B, H, Tq, Dv).to(v.dtype), lse.reshape(B, H, Tq), int(cells))

"""The block-sparse support kernel on PyTorch FlexAttention (issue #16): one backend for CPU and GPU.

A `BlockSupport` becomes a FlexAttention `BlockMask` (`BlockMask.from_kv_blocks`): per (batch, query
head, query block) the support's key blocks, split into *full* blocks (every query-key cell allowed:
strictly below the causal diagonal, inside the window, no padding query or key, no row mask) and
*partial* blocks (the diagonal, the window's edge, blocks holding padding, items with row masks),
on which alone `mask_mod` runs. Key/value heads are never repeated (`enable_gqa`); a support with
Hs < H heads is expanded to one list per query head (indices only).

Compiled (`torch.compile`: Triton on CUDA, C++ on x86 CPUs) it computes only the listed blocks and
counts its cells as the other backends do. Eager FlexAttention (`compiled=False`) computes the whole
Tq x Tk score matrix and applies the support through `mask_mod`: it is for tests only, never chosen by
`auto`, and reports every score it computed as a cell (it is not sparse).

Log-sum-exp: returned in natural log, like every backend. FlexAttention keeps its softmax statistics
in base 2 and its public API converts them (`* ln 2`). On CUDA the lse comes from the kernel
(`return_aux`). Compiled CPU FlexAttention cannot return it (torch 2.14: "return_lse is not supported
yet"), so there the call adds one *phantom* key per query row: an extra key block whose first key
has score c (the row's score against its own key, set by `score_mod`) and a value that is 1 in one
extra value channel. The row's weight w on it gives Z = e^c (1 - w) / w, so lse = c + log(1 - w) - log w
and the output is rescaled by 1 / (1 - w). With c at or below the row's largest score w <= 1/2 and
both are exact to the output dtype's precision; rows where w is tiny (< 1e-20: the kernel's exp is
approximate near underflow) or exceeds 1/2 (their own key not attended) are run again with a better
c, and rows still out of range after two such passes (scores hundreds apart) take the pure-torch
matmul path. The phantom block costs one key block per
query block.

Shapes are bucketed before compiling: the query and key grids are padded to a power-of-two number of
blocks (the padding blocks are never listed, so they cost memory, not compute), so a generate loop
or an eval grid compiles once per bucket, not per length (`compile_count`).

Token lists (`BlockSupport.tokens`) are not run here: `support_attention` runs them on the
token-gather kernel and merges them with this kernel's result through the lse, as for every backend.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import torch

# Distinct compiled graphs one process may hold for this kernel (buckets x mask variants); past it
# dynamo would silently run eager code, which here would ignore the support, so it raises instead.
RECOMPILE_LIMIT = 64

_COMPILES = 0
# Phantom weights below this are too far out for the CPU kernel's exp (approximate near underflow):
# such rows are run again with a corrected score.
TINY = 1e-20
# Extra passes with a corrected phantom score before the rows still out of range take the matmul path.
REFINE_PASSES = 2


def available() -> bool:
    """Whether torch ships FlexAttention with `BlockMask.from_kv_blocks` (torch >= 2.5)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return hasattr(BlockMask, "from_kv_blocks")


def compiled_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether compiled FlexAttention runs `dtype` (the input dtype) on `device`."""
    if not available():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cpu":
        return _cpu_compile_supported() and dtype in (torch.float32, torch.bfloat16)
    return False


@lru_cache(maxsize=1)
def _cpu_compile_supported() -> bool:
    try:
        from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported
    except ImportError:
        return False
    try:
        return bool(check_cpu_supported())
    except Exception:  # noqa: BLE001 - any failure of the probe means: not supported here
        return False


def compile_count() -> int:
    """Graphs compiled for this kernel in this process (tests check it stays bounded across lengths)."""
    return _COMPILES


def _bucket(n: int) -> int:
    """Power-of-two number of blocks >= n."""
    return 1 << max(0, n - 1).bit_length()


def _geo_full(d, bs: int, causal: bool, window: int | None):
    """Whether every (query, key) pair of a query block d blocks after its key block is allowed."""
    ok = d * bs - bs + 1 >= 0 if causal else d == d
    if window is not None:
        ok = ok & (d * bs + bs - 1 < window)
    return ok


def _geo_dead(d, bs: int, causal: bool, window: int | None):
    """Whether no pair of such a block pair is allowed."""
    dead = d * bs + bs - 1 < 0 if causal else d != d
    if window is not None:
        dead = dead | (d * bs - bs + 1 >= window)
    return dead


def _partial_offsets(bs: int, causal: bool, window: int | None) -> list[int]:
    """The block offsets d = query block - key block whose pairs are partly allowed (diagonal, window edge)."""
    if window is None:
        lo, hi = -1, 1
    else:
        lo = -1 if causal else (window - bs + 1) // bs - 1
        hi = (window + bs) // bs + 1
    return [d for d in range(lo, hi + 1)
            if not _geo_full(d, bs, causal, window) and not _geo_dead(d, bs, causal, window)]


def _plan(support, B, H, Tq, Tk, causal, window, key_valid, dev, *, phantom: bool, membership: bool):
    """The BlockMask lists, mask_mod inputs and computed cells of one call (all device tensors)."""
    from attnsieve.kernels.block_sparse import block_grid

    bs = support.block_size
    first_qb, n_q, n_k = block_grid(Tq, Tk, bs)
    NQp, NKp = _bucket(n_q), _bucket(n_k)
    extra = 1 if phantom else 0
    Lq, Lk = NQp * bs, (NKp + extra) * bs
    blocks = support.blocks.to(dev)
    Hs, K = blocks.shape[1], blocks.shape[3]
    Gs = H // Hs

    kvalid = torch.zeros(B, Lk, dtype=torch.bool, device=dev)
    kvalid[:, :Tk] = True if key_valid is None else key_valid.to(dev, torch.bool)
    qpos = first_qb * bs + torch.arange(Lq, device=dev)  # absolute position of each grid query row
    qvalid = ((qpos >= Tk - Tq) & (qpos < Tk))[None] & kvalid[:, qpos.clamp_max(Lk - 1)]  # [B, Lq]

    vb = kvalid[:, : n_k * bs].view(B, n_k, bs)
    real_keys = vb.sum(-1)  # [B, NK]
    qv = qvalid[:, : n_q * bs].view(B, n_q, bs)
    rows_real = qv.sum(-1)  # [B, NQ]

    ok = blocks >= 0
    kb = blocks.clamp_min(0)  # [B, Hs, NQ, K]
    qb = (first_qb + torch.arange(n_q, device=dev))[None, None, :, None]
    d = qb - kb
    keys_in = real_keys.gather(1, kb.reshape(B, -1)).view_as(kb)
    rows_in = rows_real[:, None, :, None]
    alive = ok & ~_geo_dead(d, bs, causal, window) & (keys_in > 0) & (rows_in > 0)
    full_geo = alive & _geo_full(d, bs, causal, window)

    # cells: full pairs hold rows x keys; partial pairs (diagonal, window edge) are counted per row
    cell = torch.where(full_geo, rows_in * keys_in, 0)
    i = torch.arange(bs, device=dev)
    jq = torch.arange(n_q, device=dev)
    for off in _partial_offsets(bs, causal, window):
        diff = off * bs + i[:, None] - i[None, :]  # [bs rows, bs keys]: query position - key position
        geo = torch.ones(bs, bs, dtype=torch.bool, device=dev)
        if causal:
            geo &= diff >= 0
        if window is not None:
            geo &= diff < window
        kbd = (first_qb + jq - off).clamp(0, n_k - 1)  # [NQ] key block at this offset
        keys = vb[:, kbd].float()  # [B, NQ, bs]
        per = ((qv.float() @ geo.float()) * keys).sum(-1).to(cell.dtype)  # [B, NQ]
        cell = torch.where(alive & (d == off), per[:, None, :, None], cell)
    cells = (cell * alive).sum() * Gs

    flex_full = full_geo & (rows_in == bs) & (keys_in == bs)
    rm = None
    if support.row_mask is not None:
        R = Gs * bs
        if support.row_mask.shape[3] != R:
            raise ValueError(f"row_mask has {support.row_mask.shape[3]} rows per item, expected {R}")
        rmask = support.row_mask.to(dev, torch.bool)
        flex_full = flex_full & rmask.all(3)
        Kp = _bucket(K)
        rm = torch.zeros(B, Hs, NQp, R, Kp, dtype=torch.bool, device=dev)
        rm[:, :, :n_q, :, :K] = rmask
    partial = alive & ~flex_full

    slot_of = None
    if rm is not None or membership:
        slot_of = torch.full((B, Hs, NQp, NKp + extra + 1), -1, dtype=torch.int32, device=dev)
        slots = torch.arange(K, dtype=torch.int32, device=dev).expand_as(kb)
        where = torch.where(ok, kb, NKp + extra)  # unused slots land in a spare column
        slot_of[:, :, :n_q].scatter_(3, where, slots)
        slot_of = slot_of[..., : NKp + extra].contiguous()

    W = NKp + extra

    def lists(sel: torch.Tensor):
        sel = sel.repeat_interleave(Gs, dim=1) if Gs > 1 else sel  # [B, H, NQ, K]
        big = NKp + 1
        idx = torch.where(sel, kb.repeat_interleave(Gs, dim=1) if Gs > 1 else kb, big).sort(-1).values
        num = sel.sum(-1, dtype=torch.int32)  # [B, H, NQ]
        if idx.shape[-1] < W:
            idx = torch.nn.functional.pad(idx, (0, W - idx.shape[-1]), value=big)
        idx = idx[..., :W]
        out_idx = torch.zeros(B, H, NQp, W, dtype=torch.int32, device=dev)
        out_idx[:, :, :n_q] = torch.where(idx == big, 0, idx).to(torch.int32)
        out_num = torch.zeros(B, H, NQp, dtype=torch.int32, device=dev)
        out_num[:, :, :n_q] = num
        return out_num, out_idx

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(flex_full)
    if phantom:  # every query block also visits the phantom block, last of its partial list
        kv_idx.scatter_(3, kv_num[..., None].long(), NKp)
        kv_num += 1
    # rows with a live slot (and, under row masks, a slot of their own): rows outside are known to be empty
    live = alive[:, :, :, None, :].expand(B, Hs, n_q, Gs * bs, K)
    if support.row_mask is not None:
        live = live & rmask
    row_live = live.any(-1).view(B, Hs, n_q, Gs, bs).transpose(2, 3).reshape(B, H, n_q * bs)
    row_live = torch.nn.functional.pad(row_live, (0, Lq - n_q * bs))
    return dict(
        kv_num=kv_num, kv_idx=kv_idx, full_num=full_num, full_idx=full_idx, qvalid=qvalid, kvalid=kvalid,
        slot_of=slot_of, rm=rm, cells=cells, row_live=row_live, first_qb=first_qb, n_q=n_q, n_k=n_k,
        Lq=Lq, Lk=Lk, Gs=Gs,
    )


def _flex_call(q, k, v, kv_num, kv_idx, full_num, full_idx, qvalid, kvalid, slot_of, rm, c, qoff, win,
               bs: int, Gs: int, causal: bool, has_window: bool, phantom: bool, membership: bool, scale: float,
               want_lse: bool):
    """Build the BlockMask and run FlexAttention; traced whole by torch.compile (one graph per bucket)."""
    from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention

    ph = k.shape[2] - bs  # the phantom key: first key of the last block

    def mask_mod(b, h, q_idx, kv_idx):
        qa = q_idx + qoff
        m = qvalid[b, q_idx] & kvalid[b, kv_idx]
        if causal:
            m = m & (kv_idx <= qa)
        if has_window:
            m = m & (qa - kv_idx < win)
        if rm is not None:
            s = h // Gs
            sl = slot_of[b, s, q_idx // bs, kv_idx // bs]
            m = m & (sl >= 0) & rm[b, s, q_idx // bs, (h % Gs) * bs + q_idx % bs, sl.clamp(min=0)]
        elif membership:
            m = m & (slot_of[b, h // Gs, q_idx // bs, kv_idx // bs] >= 0)
        if phantom:
            m = m | (kv_idx == ph)
        return m

    score_mod = None
    if phantom:
        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(kv_idx == ph, c[b, h, q_idx], score)

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=mask_mod,
                                  seq_lengths=(q.shape[2], k.shape[2]), compute_q_blocks=False)
    kernel_options = None
    if q.device.type == "cuda" and bs < 128:  # Triton's tiles must divide the sparse block
        kernel_options = {"BLOCK_M": bs, "BLOCK_N": bs}
    if want_lse:
        out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=True,
                                  kernel_options=kernel_options, return_aux=AuxRequest(lse=True))
        return out, aux.lse
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=True,
                          kernel_options=kernel_options), None


def _counting_backend(gm, example_inputs):
    global _COMPILES
    _COMPILES += 1
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


@lru_cache(maxsize=1)
def _compiled_call():
    return torch.compile(_flex_call, backend=_counting_backend, fullgraph=True, dynamic=False)


def flex_support_attention(q, k, v, support, *, causal: bool = True, window: int | None = None,
                           scale: float | None = None, key_valid: torch.Tensor | None = None,
                           compiled: bool = True):
    """Exact attention of q over the key blocks of `support` through FlexAttention: a SparseResult.

    q: [B, H, Tq, D]; k: [B, Hkv, Tk, D]; v: [B, Hkv, Tk, Dv]; key_valid: [B, Tk] bool or None.
    Same layout, grid, masks and outputs as `block_sparse_attention` (which validates the shapes and
    calls this for backend "flex" / "flex-eager"). Rows with no key get out 0 and lse -inf.
    """
    from attnsieve.kernels.block_sparse import SparseResult

    B, H, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    bs = support.block_size
    dev = q.device
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    phantom = compiled and dev.type != "cuda"
    membership = not compiled  # eager flex ignores the block lists: mask_mod applies the support
    p = _plan(support, B, H, Tq, Tk, causal, window, key_valid, dev, phantom=phantom, membership=membership)
    first_qb, Lq, Lk = p["first_qb"], p["Lq"], p["Lk"]
    lead = (Tk - Tq) - first_qb * bs
    dt = q.dtype
    if not compiled and dt not in (torch.float32, torch.float64):
        dt = torch.float32  # eager flex computes in float32 anyway
    if compiled and dt not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"compiled FlexAttention runs float32, bfloat16 or float16, got {dt}")

    qp = q.new_zeros(B, H, Lq, D, dtype=dt)
    qp[:, :, lead : lead + Tq] = q
    kp = k.new_zeros(B, Hkv, Lk, D, dtype=dt)
    kp[:, :, :Tk] = k
    Dp = Dv + 1 if phantom else Dv
    vp = v.new_zeros(B, Hkv, Lk, Dp, dtype=dt)
    vp[:, :, :Tk, :Dv] = v
    c = None
    if phantom:
        vp[:, :, Lk - bs, Dv] = 1.0  # the phantom key's value channel
        pos = (Tk - Tq + torch.arange(Tq, device=dev)).clamp(0, Tk - 1)
        own = k[:, :, pos].float()  # [B, Hkv, Tq, D]: each query's own key
        self_score = (q.float().view(B, Hkv, H // Hkv, Tq, D) * own[:, :, None]).sum(-1).view(B, H, Tq) * scale
        c = torch.zeros(B, H, Lq, dtype=torch.float32, device=dev)
        c[:, :, lead : lead + Tq] = torch.nan_to_num(self_score, nan=0.0, posinf=0.0, neginf=0.0)
    qoff = torch.tensor(first_qb * bs, device=dev)
    win = torch.tensor(0 if window is None else int(window), device=dev)
    args = (p["kv_num"], p["kv_idx"], p["full_num"], p["full_idx"], p["qvalid"], p["kvalid"], p["slot_of"], p["rm"])
    static = dict(bs=bs, Gs=p["Gs"], causal=causal, has_window=window is not None, phantom=phantom,
                  membership=membership, scale=scale, want_lse=not phantom)

    def run(c_grid):
        if not compiled:
            with warnings.catch_warnings():  # its "without torch.compile" notice: eager is what the caller asked
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                return _flex_call(qp, kp, vp, *args, c_grid, qoff, win, **static)
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            return _compiled_call()(qp, kp, vp, *args, c_grid, qoff, win, **static)

    out, lse = run(c)
    fallback = None
    if phantom:
        real = p["qvalid"][:, None, :] & p["row_live"]  # [B, H, Lq] rows known to have keys
        for step in range(REFINE_PASSES + 1):
            w = out[..., Dv].float()
            bad = real & ((w < TINY) | (w > 0.5))
            if not bool(bad.any()):
                break
            if step == REFINE_PASSES:  # still bad (scores hundreds apart): those rows from the matmul path
                fallback = bad
                break
            # w underflowed: c far below the row's scores; w > 1/2: c above them (its own key not attended)
            jump = 80.0 * 2**step
            est = c + torch.log1p(-w.clamp_max(1 - 1e-7)) - torch.log(w.clamp_min(1e-38))
            c = torch.where(bad, torch.where(w <= 0, c + jump, torch.where(w < 1, est - 8.0, c - jump)), c)
            again, _ = run(c)
            out = torch.where(bad[..., None], again, out)
        out, lse = _unphantom(out, c, Dv)
    cells = int(p["cells"]) if compiled else B * H * Tq * Tk  # eager: the whole score matrix
    out = out[:, :, lead : lead + Tq, :Dv].to(q.dtype)
    lse = lse[:, :, lead : lead + Tq].float()
    if fallback is not None:
        from attnsieve.kernels.block_sparse import block_sparse_attention

        ref = block_sparse_attention(q, k, v, support, causal=causal, window=window, scale=scale,
                                     key_valid=key_valid, backend="matmul")
        rows = fallback[:, :, lead : lead + Tq]
        out = torch.where(rows[..., None], ref.out.to(out.dtype), out)
        lse = torch.where(rows, ref.lse.float(), lse)
    return SparseResult(out, lse, cells)


def _unphantom(out, c, Dv):
    """Phantom-key output -> (output rescaled by 1 / (1 - w), natural-log lse); w = 1: a row with no key."""
    w = out[..., Dv].float()
    empty = w >= 1
    rest = (1 - w).clamp_min(1e-38)
    lse = (c + torch.log(rest) - torch.log(w.clamp_min(1e-38))).masked_fill(empty, float("-inf"))
    o = (out[..., :Dv].float() / rest[..., None]).masked_fill(empty[..., None], 0.0)
    return o, lse

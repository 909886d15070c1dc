"""Scatterbrain (exact sparse support + FAVOR+ off it) and its kernels, against slow explicit references."""

from __future__ import annotations

import math

import pytest
import torch

from attnsieve.kernels import BlockSupport, block_grid, dense_attention, exact_cells, merge
from attnsieve.kernels.sparse_lowrank import subtract, support_feature_attention
from attnsieve.methods import LayerContext, make
from attnsieve.methods.performer import favor_qk
from attnsieve.methods.scatterbrain import ScatterbrainParams, with_diagonal

from helpers import assert_close

F64 = dict(atol=1e-10, rtol=1e-10)


def qkv(B=1, H=4, Hkv=1, T=120, Tq=None, D=16, seed=0, dtype=torch.float64, amp=0.7):
    g = torch.Generator().manual_seed(seed)
    Tq = T if Tq is None else Tq
    return (torch.randn(B, H, Tq, D, generator=g, dtype=dtype) * amp,
            torch.randn(B, Hkv, T, D, generator=g, dtype=dtype) * amp,
            torch.randn(B, Hkv, T, D, generator=g, dtype=dtype))


def support_token_mask(support: BlockSupport, H: int, Tq: int, Tk: int) -> torch.Tensor:
    """[B, H, Tq, Tk] cells a support (and its row masks) stands for, by explicit loops. Tests only."""
    bs = support.block_size
    first, n_q, _ = block_grid(Tq, Tk, bs)
    B, Hs, _, K = support.blocks.shape
    Gs = H // Hs
    mask = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for s in range(Hs):
            for j in range(n_q):
                for slot in range(K):
                    blk = int(support.blocks[b, s, j, slot])
                    if blk < 0:
                        continue
                    for r in range(Gs * bs):
                        i = (first + j) * bs + r % bs - (Tk - Tq)
                        if not 0 <= i < Tq:
                            continue
                        if support.row_mask is not None and not bool(support.row_mask[b, s, j, r, slot]):
                            continue
                        mask[b, s * Gs + r // bs, i, blk * bs : (blk + 1) * bs] = True
    return mask


def visible_mask(B, Tq, Tk, window=None, key_valid=None) -> torch.Tensor:
    """[B, 1, Tq, Tk] cells the exact causal (sliding) layer computes."""
    qp, kp = torch.arange(Tk - Tq, Tk)[:, None], torch.arange(Tk)[None, :]
    m = (kp <= qp) if window is None else (kp <= qp) & (qp - kp < window)
    m = m[None, None].expand(B, 1, Tq, Tk)
    return m & key_valid[:, None, None, :] if key_valid is not None else m


def log_feature_matrix(fq, lq, fk, lk):
    """[B, H, Tq, Tk] log(phi(q) . phi(k)) (fp64, GQA by repetition). Tests only."""
    G = fq.shape[1] // fk.shape[1]
    fk, lk = fk.repeat_interleave(G, 1).double(), lk.repeat_interleave(G, 1).double()
    return torch.log(fq.double() @ fk.transpose(-1, -2)) + lq.double()[..., None] + lk[..., None, :]


def normalised(log_a, v):
    """Row-normalised exp(log_a) @ v and its log normaliser; empty rows give 0 and -inf."""
    G = log_a.shape[1] // v.shape[1]
    lse = torch.logsumexp(log_a, -1)
    p = torch.exp(log_a - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    return p @ v.repeat_interleave(G, 1).double(), lse


# ---------------------------------------------------------------- kernels


def random_support(B, Hs, Tq, Tk, bs, Gs, seed, row_masks):
    g = torch.Generator().manual_seed(seed)
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    qb = torch.arange(first, first + n_q)[:, None]
    bm = (torch.rand(B, Hs, n_q, n_k, generator=g) < 0.5) & (torch.arange(n_k)[None, :] <= qb)
    sup = BlockSupport.from_mask(bm, bs)
    if row_masks:
        rm = torch.rand(*sup.blocks.shape[:3], Gs * bs, sup.blocks.shape[3], generator=g) < 0.7
        sup = BlockSupport(sup.blocks, bs, rm)
    return sup


SUPPORT_CASES = [  # B, H, Hkv, Hs, Tq, Tk, bs, window, padded, row masks, skip diagonal
    (1, 4, 1, 4, 70, 70, 16, None, False, False, False),
    (2, 4, 1, 1, 70, 70, 16, None, True, True, False),
    (1, 4, 2, 2, 50, 90, 16, 37, False, True, True),
    (2, 2, 2, 2, 64, 64, 16, 20, True, False, True),
    (1, 2, 1, 2, 1, 33, 16, None, False, False, False),
]


@pytest.mark.parametrize("case", SUPPORT_CASES, ids=lambda c: f"H{c[1]}kv{c[2]}s{c[3]}Tq{c[4]}Tk{c[5]}w{c[7]}")
def test_support_feature_kernel_equals_masked_reference(case):
    B, H, Hkv, Hs, Tq, Tk, bs, window, padded, row_masks, skip = case
    g = torch.Generator().manual_seed(Tq + Tk)
    d = torch.float64
    fq, fk = torch.rand(B, H, Tq, 8, generator=g, dtype=d), torch.rand(B, Hkv, Tk, 8, generator=g, dtype=d)
    lq, lk = torch.randn(B, H, Tq, generator=g, dtype=d) * 4, torch.randn(B, Hkv, Tk, generator=g, dtype=d) * 4
    v = torch.randn(B, Hkv, Tk, 5, generator=g, dtype=d)
    valid = None
    if padded:
        valid = torch.ones(B, Tk, dtype=torch.bool)
        valid[0, :21] = False
    sup = random_support(B, Hs, Tq, Tk, bs, H // Hs, Tq, row_masks)
    res = support_feature_attention(fq, lq, fk, lk, v, sup, window=window, key_valid=valid, skip_diagonal=skip,
                                    chunk_elems=5000)  # small chunks: several passes
    cells = support_token_mask(sup, H, Tq, Tk) & visible_mask(B, Tq, Tk, window, valid)
    if skip:
        qp, kp = torch.arange(Tk - Tq, Tk)[:, None], torch.arange(Tk)[None, :]
        cells &= (qp // bs != kp // bs)[None, None]
    if valid is not None:
        cells &= valid[:, None, Tk - Tq :, None]  # padding queries cover nothing
    ref, ref_lse = normalised(log_feature_matrix(fq, lq, fk, lk).masked_fill(~cells, -math.inf), v)
    assert torch.equal(res.covered, cells.sum(-1))
    assert res.cells == int(cells.sum())
    rows = torch.isfinite(ref_lse)
    assert_close(res.out[rows], ref[rows], **F64)
    assert_close(res.lse[rows], ref_lse[rows], **F64)
    assert bool((res.lse[~rows] == -math.inf).all()) and bool((res.out[~rows] == 0).all())


def test_subtract_inverts_merge():
    """Attention over all keys minus attention over a subset = attention over the rest."""
    q, k, v = qkv(T=50, seed=1)
    sub = torch.rand(1, 1, 50, 50, generator=torch.Generator().manual_seed(2)) < 0.3
    all_o, all_l = dense_attention(q, k, v)
    sub_o, sub_l = dense_attention(q, k, v, mask=sub)
    rest_o, rest_l = dense_attention(q, k, v, mask=~sub)
    out, lse = subtract(all_o, all_l, sub_o, sub_l)
    rows = torch.isfinite(rest_l)
    assert_close(out[rows], rest_o[rows], atol=1e-9, rtol=1e-9)
    assert_close(lse[rows], rest_l[rows], atol=1e-9, rtol=1e-9)
    assert bool((lse[~rows] == -math.inf).all())  # nothing left: empty, not NaN
    back, back_l = merge(out, lse, sub_o, sub_l)
    assert_close(back, all_o, atol=1e-9, rtol=1e-9)
    empty, empty_l = subtract(sub_o, sub_l, all_o, all_l)  # "more removed than there was": empty
    assert bool((empty_l == -math.inf).all()) and bool((empty == 0).all())


# ---------------------------------------------------------------- the Scatterbrain invariant


INVARIANT_CASES = [  # H, Hkv, T, Tq, density, window, padded, per_head
    (4, 1, 120, 120, 0.2, None, False, True),
    (4, 4, 120, 120, 0.4, None, False, True),
    (4, 2, 150, 150, 0.3, None, True, False),
    (4, 1, 140, 140, 0.3, 40, False, True),
    (2, 1, 130, 60, 0.3, None, False, True),
    (2, 2, 100, 100, 0.25, 50, True, False),
]


@pytest.mark.parametrize("case", INVARIANT_CASES, ids=lambda c: f"H{c[0]}kv{c[1]}T{c[2]}q{c[3]}d{c[4]}w{c[5]}")
def test_output_is_the_normalised_implied_matrix(case):
    """exp(q.k) on the support, phi(q).phi(k) elsewhere (causal), row-normalised, times V."""
    H, Hkv, T, Tq, density, window, padded, per_head = case
    B = 2 if padded else 1
    q, k, v = qkv(B=B, H=H, Hkv=Hkv, T=T, Tq=Tq, seed=T + Tq)
    valid = None
    if padded:
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[1, :29] = False
    method = make("scatterbrain", density=density, block_size=16, nb_features=64, seed=3,
                  inner_params={"per_head": per_head})
    ctx = LayerContext(5, q.shape[-1] ** -0.5, window, valid)
    res = method.prefill(q, k, v, ctx)

    support = with_diagonal(method.inner.support(q, k, ctx), Tq, T)
    fq, lq, fk, lk = favor_qk(q, k, ctx.scale, 64, 3, 5, True)
    exact_log = (q @ k.repeat_interleave(H // Hkv, 1).transpose(-1, -2)) * ctx.scale
    on = support_token_mask(support, H, Tq, T)
    log_a = torch.where(on, exact_log, log_feature_matrix(fq, lq, fk, lk))
    log_a = log_a.masked_fill(~visible_mask(B, Tq, T, window, valid), -math.inf)
    ref, ref_lse = normalised(log_a, v)
    rows = torch.ones(B, 1, Tq, dtype=torch.bool) if valid is None else valid[:, None, T - Tq :]
    rows = rows.expand(B, H, Tq)
    assert_close(res.out[rows], ref[rows], atol=1e-9, rtol=1e-9)
    assert_close(res.lse[rows], ref_lse[rows], atol=1e-9, rtol=1e-9)
    assert not torch.allclose(res.out[rows], dense_attention(q, k, v, window=window, key_valid=valid)[0][rows])
    assert 0 < res.cells < H * exact_cells(Tq, T, window=window, key_valid=valid)


def test_diagonal_block_is_added_where_missing():
    blocks = torch.tensor([[[[0, -1], [0, -1], [1, 2]]]])  # query blocks 0..2; block 1 lacks its diagonal
    sup = with_diagonal(BlockSupport(blocks, 16), 48, 48)
    assert sorted(b for b in sup.to_mask(3)[0, 0, 1].nonzero().view(-1).tolist()) == [0, 1]
    assert sup.to_mask(3)[0, 0].diagonal().all()
    rm = torch.zeros(1, 1, 3, 16, 2, dtype=torch.bool)
    rm[..., 0] = True
    sup = with_diagonal(BlockSupport(blocks, 16, rm), 48, 48)
    assert sup.row_mask.shape[-1] == 3 and bool(sup.row_mask[0, 0, 0, :, 0].all())  # diagonal row-masked in
    assert bool(sup.row_mask[0, 0, 2, :, 1].all())  # block 2's own diagonal, masked out before, is back


# ---------------------------------------------------------------- behaviour


def test_beats_its_sparse_part_and_its_low_rank_part_alone():
    """On diffuse attention, adding the low-rank estimate lowers the sparse part's error (and beats FAVOR+)."""
    q, k, v = qkv(T=512, D=32, seed=4, dtype=torch.float32, amp=0.5)
    ctx = LayerContext(0, 32**-0.5)
    ref, _ = dense_attention(q, k, v)

    def err(name, **kw):
        return float((make(name, **kw).prefill(q, k, v, ctx).out - ref).norm() / ref.norm())

    sb = err("scatterbrain", density=0.2, block_size=32)
    assert sb < 0.5 * err("block-topk", density=0.2, block_size=32)
    assert sb < err("performer", hyperbolic=True)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.6])
def test_density_sets_the_exact_part(density):
    q, k, v = qkv(T=1024, D=32, seed=5, dtype=torch.float32)
    q = q[:, :, :1] + 0.3 * q  # neighbouring queries correlated, as in real models
    res = make("scatterbrain", density=density, block_size=32, nb_features=32).prefill(
        q, k, v, LayerContext(0, 32**-0.5))
    measured = res.cells / (4 * exact_cells(1024, 1024))
    assert 0.7 * density <= measured <= 1.3 * density + 0.04, measured


def test_params_are_checked():
    with pytest.raises(ValueError, match="inner"):
        ScatterbrainParams(inner="performer")
    with pytest.raises(ValueError, match="inner"):
        ScatterbrainParams(inner="nope")
    with pytest.raises(ValueError, match="density"):
        ScatterbrainParams(density=0)
    with pytest.raises(ValueError, match="density"):
        ScatterbrainParams(inner_params={"density": 0.3})
    with pytest.raises(ValueError, match="summary"):
        ScatterbrainParams(inner_params={"summary": "median"})  # the inner method's own check
    with pytest.raises(ValueError, match="block_size"):
        ScatterbrainParams(block_size=8)
    with pytest.raises(ValueError, match="nb_features"):
        ScatterbrainParams(nb_features=1)

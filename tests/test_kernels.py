"""Kernels against a masked dense reference (fp32, 1e-5), with hypothesis-generated shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnsieve.kernels import (
    BlockSupport,
    block_grid,
    block_sparse_attention,
    dense_attention,
    exact_cells,
    local_attention,
    merge,
    token_mask,
)
from attnsieve.kernels.block_sparse import resolve_backend

from helpers import assert_close, masked_dense_reference


def _runs(backend: str) -> bool:
    try:
        resolve_backend(backend, torch.device("cpu"), torch.float32)
    except ValueError:
        return False
    return True


SETTINGS = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])


def qkv(B, H, Hkv, Tq, Tk, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype)
    return q, k, v


def support_to_token_mask(support: BlockSupport, H: int, Tq: int, Tk: int) -> torch.Tensor:
    """Expand a block support (and its row masks) into the [B, H, Tq, Tk] token mask it stands for."""
    bs = support.block_size
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    B, Hs = support.blocks.shape[:2]
    Gs = H // Hs
    blocks = torch.where(support.blocks >= 0, support.blocks, n_k)  # [B, Hs, NQ, K]
    R = Gs * bs
    rows = support.row_mask
    if rows is None:
        rows = torch.ones(B, Hs, n_q, R, blocks.shape[-1], dtype=torch.bool)
    own = torch.zeros(B, Hs, n_q, R, n_k + 1, dtype=torch.bool)
    own.scatter_(4, blocks[:, :, :, None, :].expand_as(rows), rows & (support.blocks >= 0)[:, :, :, None, :])
    # rows are head-major: row r of item (b, s, j) is head s * Gs + r // bs at grid position j * bs + r % bs
    own = own[..., :n_k].view(B, Hs, n_q, Gs, bs, n_k).permute(0, 1, 3, 2, 4, 5).reshape(B, H, n_q * bs, n_k)
    lead = (Tk - Tq) - first * bs
    own = own[:, :, lead : lead + Tq]
    k_blk = torch.arange(Tk) // bs
    return own[:, :, :, k_blk]


BACKENDS = [b for b in ("compiled", "mkl", "flash", "matmul") if _runs(b)]


@st.composite
def sparse_case(draw):
    Hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 3]))
    B = draw(st.integers(1, 2))
    Tk = draw(st.sampled_from([1, 5, 63, 64, 65, 130, 257]))
    Tq = draw(st.sampled_from([Tk, max(1, Tk // 3), 1]))
    bs = draw(st.sampled_from([16, 32, 64]))
    causal = draw(st.booleans())
    shared = draw(st.booleans())
    density = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 10_000))
    backend = draw(st.sampled_from(BACKENDS))
    window = draw(st.sampled_from([None, None, 1, 20, 100]))
    row_masks = draw(st.booleans())
    return B, Hkv * G, Hkv, Tq, Tk, bs, causal, shared, density, seed, backend, window, row_masks


@SETTINGS
@given(sparse_case())
def test_block_sparse_equals_masked_dense(case):
    B, H, Hkv, Tq, Tk, bs, causal, shared, density, seed, backend, window, row_masks = case
    D = 16
    q, k, v = qkv(B, H, Hkv, Tq, Tk, D, seed)
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    Hs = Hkv if shared else H
    g = torch.Generator().manual_seed(seed + 1)
    block_mask = torch.rand(B, Hs, n_q, n_k, generator=g) < density
    support = BlockSupport.from_mask(block_mask, bs)
    if row_masks:
        R = H // Hs * bs
        rm = torch.rand(*support.blocks.shape[:3], R, support.blocks.shape[3], generator=g) < 0.6
        support = BlockSupport(support.blocks, bs, rm)
    key_valid = None
    if B > 1:  # left padding on the first row
        key_valid = torch.ones(B, Tk, dtype=torch.bool)
        key_valid[0, : Tk // 4] = False
    res = block_sparse_attention(
        q, k, v, support, causal=causal, window=window, key_valid=key_valid, backend=backend
    )

    allowed = support_to_token_mask(support, H, Tq, Tk)
    allowed &= token_mask(torch.arange(Tk - Tq, Tk), torch.arange(Tk), causal=causal, window=window)
    if key_valid is not None:
        allowed &= key_valid[:, None, None, :]
        q_real = key_valid[:, Tk - Tq :]
        allowed &= q_real[:, None, :, None]
    ref_out, ref_lse = masked_dense_reference(q, k, v, allowed)
    assert_close(res.out, ref_out, what="out")
    assert_close(res.lse, ref_lse, what="lse")
    if not row_masks:
        assert res.cells == int(allowed.sum())
    else:  # with row masks every live slot's scores count for the whole item, on every backend
        ref = block_sparse_attention(
            q, k, v, support, causal=causal, window=window, key_valid=key_valid, backend="matmul"
        )
        assert res.cells == ref.cells >= int(allowed.sum())
    assert not torch.isnan(res.out).any() and not torch.isnan(res.lse).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_block_sparse_backends_agree_across_dtypes(backend, dtype):
    """Every backend runs fp64 and half-precision inputs (accumulating in fp32) like the matmul path."""
    q, k, v = qkv(2, 6, 2, 150, 150, 32, seed=9, dtype=dtype)
    g = torch.Generator().manual_seed(4)
    first, n_q, n_k = block_grid(150, 150, 32)
    support = BlockSupport.from_mask(torch.rand(2, 6, n_q, n_k, generator=g) < 0.5, 32)
    key_valid = torch.ones(2, 150, dtype=torch.bool)
    key_valid[1, :40] = False
    try:
        res = block_sparse_attention(q, k, v, support, key_valid=key_valid, backend=backend)
    except ValueError:
        pytest.skip(f"{backend} does not run {dtype} here")
    ref = block_sparse_attention(q.double(), k.double(), v.double(), support, key_valid=key_valid, backend="matmul")
    tol = 1e-9 if dtype == torch.float64 else 2e-2
    assert res.out.dtype == dtype
    assert_close(res.out.double(), ref.out, atol=tol, rtol=tol, what="out")
    assert res.cells == ref.cells


def test_block_sparse_unknown_backend_is_a_value_error():
    q, k, v = qkv(1, 2, 1, 64, 64, 16)
    support = BlockSupport.from_mask(torch.ones(1, 2, 1, 1, dtype=torch.bool), 64)
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_attention(q, k, v, support, backend="cuda-magic")


SHAPES = [
    pytest.param(1, 1, 1, 1, 1, id="T1"),
    pytest.param(2, 4, 4, 63, 63, id="MHA-T63"),
    pytest.param(1, 6, 2, 1000, 1000, id="GQA-T1000"),
    pytest.param(1, 4, 1, 37, 300, id="GQA-chunk-Tq37-Tk300"),
]


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk", SHAPES)
@pytest.mark.parametrize(
    "causal,window", [(True, None), (False, None), (True, 17)], ids=["causal", "full", "causal-win17"]
)
def test_dense_equals_reference(B, H, Hkv, Tq, Tk, causal, window):
    q, k, v = qkv(B, H, Hkv, Tq, Tk, 32)
    out, lse = dense_attention(q, k, v, causal=causal, window=window, q_chunk=128)
    allowed = token_mask(torch.arange(Tk - Tq, Tk), torch.arange(Tk), causal=causal, window=window)
    ref_out, ref_lse = masked_dense_reference(q, k, v, allowed.expand(B, H, Tq, Tk))
    assert_close(out, ref_out, what="out")
    assert_close(lse, ref_lse, what="lse")


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk", SHAPES)
@pytest.mark.parametrize("shared", [True, False], ids=["group-list", "head-list"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_sparse_full_support_equals_dense(B, H, Hkv, Tq, Tk, shared, backend):
    q, k, v = qkv(B, H, Hkv, Tq, Tk, 32, seed=3)
    first, n_q, n_k = block_grid(Tq, Tk, 64)
    support = BlockSupport.from_mask(torch.ones(B, Hkv if shared else H, n_q, n_k, dtype=torch.bool), 64)
    res = block_sparse_attention(q, k, v, support, causal=True, backend=backend)
    out, lse = dense_attention(q, k, v, causal=True)
    assert_close(res.out, out)
    assert_close(res.lse, lse)
    assert res.cells == H * exact_cells(Tq, Tk, causal=True) * B


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (63, 63), (1000, 1000), (100, 700), (1, 513)])
@pytest.mark.parametrize("window", [1, 17, 64, 512, 5000])
def test_local_attention_equals_windowed_dense(Tq, Tk, window):
    q, k, v = qkv(1, 4, 1, Tq, Tk, 16, seed=5)
    key_valid = torch.ones(1, Tk, dtype=torch.bool)
    res = local_attention(q, k, v, window=window, key_valid=key_valid)
    out, lse = dense_attention(q, k, v, causal=True, window=window)
    assert_close(res.out, out)
    assert_close(res.lse, lse)
    assert res.cells == 4 * exact_cells(Tq, Tk, window=window)


def test_local_attention_is_banded_not_quadratic():
    """At T=1000 and window 64 the band computes ~T*window cells, far below the causal triangle."""
    q, k, v = qkv(1, 2, 1, 1000, 1000, 16)
    res = local_attention(q, k, v, window=64, block_size=32)
    assert res.cells == 2 * exact_cells(1000, 1000, window=64)
    assert res.cells < 0.15 * 2 * exact_cells(1000, 1000)


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (63, 63), (1000, 1000), (10, 90)])
def test_merge_of_split_equals_whole(Tq, Tk):
    q, k, v = qkv(2, 4, 2, Tq, Tk, 16, seed=7)
    split = torch.rand(Tk, generator=torch.Generator().manual_seed(1)) < 0.4
    whole = dense_attention(q, k, v, causal=True)
    a = dense_attention(q, k, v, causal=True, mask=split[None, None, None, :])
    b = dense_attention(q, k, v, causal=True, mask=~split[None, None, None, :])
    out, lse = merge(*a, *b)
    assert_close(out, whole[0])
    assert_close(lse, whole[1])


def test_row_with_no_keys_gives_zeros_and_neg_inf():
    q, k, v = qkv(1, 2, 1, 8, 8, 16)
    empty = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    out, lse = dense_attention(q, k, v, mask=empty)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    support = BlockSupport(torch.full((1, 2, 1, 1), -1, dtype=torch.long), 16)
    res = block_sparse_attention(q, k, v, support)
    assert torch.equal(res.out, torch.zeros_like(res.out)) and bool(torch.isneginf(res.lse).all())
    assert res.cells == 0
    m_out, m_lse = merge(out, lse, out, lse)
    assert not torch.isnan(m_out).any() and bool(torch.isneginf(m_lse).all())


def test_bf16_within_its_tolerance():
    q, k, v = qkv(1, 4, 2, 200, 200, 32, dtype=torch.bfloat16)
    first, n_q, n_k = block_grid(200, 200, 32)
    support = BlockSupport.from_mask(torch.ones(1, 2, n_q, n_k, dtype=torch.bool), 32)
    res = block_sparse_attention(q, k, v, support)
    ref, _ = dense_attention(q.float(), k.float(), v.float())
    assert res.out.dtype == torch.bfloat16
    assert_close(res.out, ref.to(torch.bfloat16))


def test_exact_cells_counts_padding_and_window():
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])
    # row 0: queries 2,3,4 see 1,2,3 real keys; row 1: 1..5; window 2 caps each at 2
    assert exact_cells(5, 5, key_valid=valid) == 6 + 15
    assert exact_cells(5, 5, key_valid=valid, window=2) == (1 + 2 + 2) + (1 + 2 + 2 + 2 + 2)
    assert exact_cells(2, 5, key_valid=valid) == (2 + 3) + (4 + 5)


def test_bad_support_shape_is_a_clear_error():
    q, k, v = qkv(1, 2, 1, 10, 10, 8)
    with pytest.raises(ValueError, match="support shape"):
        block_sparse_attention(q, k, v, BlockSupport(torch.zeros(1, 2, 5, 1, dtype=torch.long), 16))
    with pytest.raises(ValueError, match="block_size"):
        BlockSupport(torch.zeros(1, 2, 1, 1, dtype=torch.long), 0)

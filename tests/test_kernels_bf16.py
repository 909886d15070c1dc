"""bf16 on the CPU's matrix units, and non-finite inputs, against the masked dense reference.

The compiled kernels compute bf16 natively (bf16 products, float32 accumulation and softmax) where
oneDNN drives the CPU's bf16 units; those tests skip elsewhere, saying so. The reference runs in
float64 on the same bf16-rounded inputs, so the tolerance measures only the kernel's own rounding
(probabilities rounded to bf16 before the P x V product). The non-finite property runs on every
backend: a row's output is non-finite exactly where the reference's is.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_compiled import own_blocks
from test_kernels import BACKENDS, qkv, support_to_token_mask

from attnsieve.kernels import BlockSupport, block_grid, block_sparse_attention, compiled, token_mask
from attnsieve.kernels.token_gather import token_gather_attention
from attnsieve.methods import LayerContext, make
from attnsieve.methods.block_topk import BlockTopK
from attnsieve.precision import kernel_path, resolve_dtype

from helpers import assert_close, masked_dense_reference

needs_bf16 = pytest.mark.skipif(
    not compiled.bf16_available(), reason="no native bf16 path here (compiled kernel or bf16 matrix units missing)"
)
SETTINGS = settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
# bf16 outputs: probabilities are rounded to bf16 (relative 2^-9) before P x V
OUT_TOL = dict(atol=2e-2, rtol=2e-2)
LSE_TOL = dict(atol=2e-3, rtol=2e-3)  # scores: exact bf16 products summed in float32


@st.composite
def bf16_case(draw):
    Hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 3]))
    B = draw(st.integers(1, 2))
    Tk = draw(st.sampled_from([1, 17, 64, 65, 130, 257]))
    Tq = draw(st.sampled_from([Tk, max(1, Tk // 3), 1]))
    bs = draw(st.sampled_from([16, 32, 64, 128]))
    D = draw(st.sampled_from([16, 64, 80]))
    return dict(
        B=B, H=Hkv * G, Hkv=Hkv, Tq=Tq, Tk=Tk, bs=bs, D=D, causal=draw(st.booleans()), shared=draw(st.booleans()),
        density=draw(st.floats(0.0, 1.0)), seed=draw(st.integers(0, 10_000)),
        window=draw(st.sampled_from([None, None, 1, 20, 100])), row_masks=draw(st.booleans()),
    )


def random_support(B, Hs, Tq, Tk, bs, density, row_masks, R, g):
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    support = BlockSupport.from_mask(torch.rand(B, Hs, n_q, n_k, generator=g) < density, bs)
    if row_masks:
        rm = torch.rand(*support.blocks.shape[:3], R, support.blocks.shape[3], generator=g) < 0.6
        support = BlockSupport(support.blocks, bs, rm)
    return support


def reference_mask(support, H, Tq, Tk, causal, window, key_valid):
    allowed = support_to_token_mask(support, H, Tq, Tk)
    allowed &= token_mask(torch.arange(Tk - Tq, Tk), torch.arange(Tk), causal=causal, window=window)
    if key_valid is not None:
        allowed &= key_valid[:, None, None, :]
        allowed &= key_valid[:, Tk - Tq :][:, None, :, None]
    return allowed


@needs_bf16
@SETTINGS
@given(bf16_case())
def test_bf16_block_sparse_equals_masked_dense(c):
    """Blocks, row masks, windows, padding, GQA and chunked queries, natively in bf16."""
    B, H, Hkv, Tq, Tk, bs, D = c["B"], c["H"], c["Hkv"], c["Tq"], c["Tk"], c["bs"], c["D"]
    assert compiled.native_dtype(torch.bfloat16, bs, D, D) == torch.bfloat16  # the bf16 engine, not a conversion
    q, k, v = qkv(B, H, Hkv, Tq, Tk, D, c["seed"], dtype=torch.bfloat16)
    Hs = Hkv if c["shared"] else H
    g = torch.Generator().manual_seed(c["seed"] + 1)
    support = random_support(B, Hs, Tq, Tk, bs, c["density"], c["row_masks"], H // Hs * bs, g)
    key_valid = None
    if B > 1:
        key_valid = torch.ones(B, Tk, dtype=torch.bool)
        key_valid[0, : Tk // 4] = False
    res = block_sparse_attention(q, k, v, support, causal=c["causal"], window=c["window"], key_valid=key_valid,
                                 backend="compiled")
    allowed = reference_mask(support, H, Tq, Tk, c["causal"], c["window"], key_valid)
    ref_out, ref_lse = masked_dense_reference(q.double(), k.double(), v.double(), allowed)
    assert res.out.dtype == torch.bfloat16
    assert_close(res.out.double(), ref_out, **OUT_TOL, what="out")
    assert_close(res.lse.double(), ref_lse, **LSE_TOL, what="lse")
    f32 = block_sparse_attention(q.float(), k.float(), v.float(), support, causal=c["causal"], window=c["window"],
                                 key_valid=key_valid, backend="compiled")
    assert res.cells == f32.cells  # the same cells counted as in float32


@needs_bf16
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("Tq,Tk,heads,Hs", [(100, 100, (4, 2), 2), (30, 130, (3, 1), 3), (1, 77, (2, 2), 2)])
def test_bf16_token_gather_equals_masked_dense(Tq, Tk, heads, Hs, window):
    H, Hkv = heads
    bs, D = 16, 64
    q, k, v = qkv(2, H, Hkv, Tq, Tk, D, seed=3, dtype=torch.bfloat16)
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    g = torch.Generator().manual_seed(5)
    tokens = torch.stack([torch.randperm(Tk, generator=g)[: min(Tk, 37)] for _ in range(2 * Hs * n_q)])
    tokens = tokens.view(2, Hs, n_q, -1)
    tokens[..., -3:] = -1
    valid = torch.ones(2, Tk, dtype=torch.bool)
    valid[1, :10] = False
    res = token_gather_attention(q, k, v, tokens, bs, window=window, key_valid=valid, backend="compiled")
    ref = token_gather_attention(q.double(), k.double(), v.double(), tokens, bs, window=window, key_valid=valid,
                                 backend="torch")
    assert res.out.dtype == torch.bfloat16
    assert_close(res.out.double(), ref.out, **OUT_TOL, what="out")
    finite = torch.isfinite(ref.lse)
    assert torch.equal(torch.isfinite(res.lse), finite)
    assert_close(res.lse.double()[finite], ref.lse[finite], **LSE_TOL, what="lse")
    assert res.cells == ref.cells


@needs_bf16
def test_bf16_full_support_runs_torch_flash_in_bf16():
    """Density 1 takes the fused causal path in the inputs' own dtype (no float32 upcast)."""
    q, k, v = qkv(1, 4, 1, 300, 300, 64, dtype=torch.bfloat16)
    m = make("block-topk", density=1.0)
    ctx = LayerContext(0, 64**-0.5)
    res = m.prefill(q, k, v, ctx).out
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert res.dtype == torch.bfloat16
    assert_close(res, ref)


@needs_bf16
@pytest.mark.parametrize("params", [dict(density=0.1), dict(density=0.3, per_head=False), dict(token_budget=256)],
                         ids=["d0.1", "per-group", "budget"])
def test_bf16_planner_selects_nearly_the_float32_blocks(params, monkeypatch):
    """block-topk's bf16 bound GEMM differs from float32's only in accumulation order: selections
    agree except at near-ties (measured here: under 1% of a row's chosen blocks on random inputs)."""
    g = torch.Generator().manual_seed(11)
    T, D = 2048, 64
    q = torch.randn(1, 4, T, D, generator=g).bfloat16()
    k = torch.randn(1, 2, T, D, generator=g).bfloat16()
    method = make("block-topk", block_size=32, **params)
    ctx = LayerContext(0, D**-0.5)
    fast = method.support(q, k, ctx)
    f32 = method.support(q.float(), k.float(), ctx)
    n_k = block_grid(T, T, 32)[2]
    own_fast, own_ref = own_blocks(fast, n_k), own_blocks(f32, n_k)
    differ = (own_fast != own_ref).sum().item() / max(1, own_ref.sum().item())
    assert differ < 0.01, f"{differ:.2%} of chosen (row, block) pairs differ"


@st.composite
def nonfinite_case(draw):
    Tk = draw(st.sampled_from([5, 64, 130]))
    Tq = draw(st.sampled_from([Tk, max(1, Tk // 3)]))
    where = draw(st.sampled_from(["k", "q"]))
    value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    pos = draw(st.integers(0, Tq - 1 if where == "q" else Tk - 1))
    backend = draw(st.sampled_from(BACKENDS))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16] if compiled.bf16_available() else [torch.float32]))
    return Tq, Tk, where, value, pos, backend, draw(st.sampled_from([None, 20])), draw(st.floats(0.2, 1.0)), dtype


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(nonfinite_case())
def test_nonfinite_rows_match_the_reference_on_every_backend(case):
    """A NaN or infinite query or key makes exactly the rows that attend it non-finite, as in the
    reference: no backend zeroes them, and none spreads them to rows that do not attend it."""
    Tq, Tk, where, value, pos, backend, window, density, dtype = case
    H, Hkv, D, bs = 2, 1, 16, 16
    q, k, v = qkv(1, H, Hkv, Tq, Tk, D, seed=pos, dtype=dtype)
    (q if where == "q" else k)[0, 0, pos, 3] = value
    g = torch.Generator().manual_seed(pos)
    support = random_support(1, H, Tq, Tk, bs, density, False, bs, g)
    try:
        res = block_sparse_attention(q, k, v, support, window=window, backend=backend)
    except ValueError:
        pytest.skip(f"{backend} does not run {dtype} here")
    allowed = reference_mask(support, H, Tq, Tk, True, window, None)
    ref_out, _ = masked_dense_reference(q.double(), k.double(), v.double(), allowed)
    want = ~torch.isfinite(ref_out).all(-1)
    got = ~torch.isfinite(res.out).all(-1)
    assert torch.equal(got, want), f"non-finite rows {got.nonzero().tolist()} != reference {want.nonzero().tolist()}"


def test_dtype_auto_follows_the_amx_flag(monkeypatch):
    monkeypatch.setattr(compiled, "has_amx_bf16", lambda: True)
    assert resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(compiled, "has_amx_bf16", lambda: False)
    assert resolve_dtype("auto") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16  # explicit bf16 runs on any CPU
    assert resolve_dtype(None) == torch.float32
    with pytest.raises(ValueError, match="--dtype must be one of auto, float32, bfloat16, got 'half'"):
        resolve_dtype("half")


def test_kernel_path_says_which_path_and_why(monkeypatch):
    p32 = kernel_path(torch.float32)
    assert set(p32) == {"kernel_path", "why"}
    monkeypatch.setattr(compiled, "bf16_available", lambda: False)
    if compiled.available():
        assert kernel_path(torch.bfloat16)["kernel_path"] == "compiled-fp32"
        assert "converted" in kernel_path(torch.bfloat16)["why"]


def test_planner_torch_path_accepts_bf16(monkeypatch):
    """The reference planner (no compiled kernels) takes bf16 queries too."""
    monkeypatch.setattr(BlockTopK, "use_compiled", False)
    q, k, _ = qkv(1, 2, 1, 200, 200, 16, dtype=torch.bfloat16)
    support = make("block-topk", density=0.3, block_size=16).support(q, k, LayerContext(0, 0.25))
    assert support.num_blocks() > 0


needs_amx_tiles = pytest.mark.skipif(
    not compiled.amx_tiles(), reason="attnsieve's own AMX tile kernels do not run here (no AMX bf16 tiles)"
)
# (B, H, Hkv, Tq, Tk, bs, D, causal, window, row masks, padded): grouped blocks from anywhere in
# the sequence, GQA, a window, partial tiles, padding rows and keys, a query chunk, several bs / D
AMX_CASES = [
    (1, 4, 1, 700, 700, 64, 256, True, None, True, False),
    (2, 6, 2, 300, 300, 32, 64, True, 100, True, True),
    (1, 3, 3, 96, 500, 128, 96, True, None, False, False),
    (1, 2, 1, 256, 256, 64, 64, False, None, True, False),
]


@needs_amx_tiles
@pytest.mark.parametrize("case", AMX_CASES, ids=lambda c: f"T{c[3]}x{c[4]}-bs{c[5]}-D{c[6]}")
def test_amx_tile_kernels_equal_onednn_and_the_reference(case, monkeypatch):
    """The own AMX kernels (groups of any blocks summed in the tiles, tile-major packing) against
    oneDNN's brgemm path (ATTNSIEVE_AMX=0) and the float64 masked dense reference: the same cells,
    outputs equal within bf16 rounding, and both within the kernel tolerance of the reference."""
    B, H, Hkv, Tq, Tk, bs, D, causal, window, row_masks, padded = case
    q, k, v = qkv(B, H, Hkv, Tq, Tk, D, 5, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    support = random_support(B, H, Tq, Tk, bs, 0.4, row_masks, bs, g)
    key_valid = None
    if padded:
        key_valid = torch.ones(B, Tk, dtype=torch.bool)
        key_valid[0, :37] = False
    kw = dict(causal=causal, window=window, key_valid=key_valid, backend="compiled")
    monkeypatch.setenv("ATTNSIEVE_AMX", "1")
    assert compiled.amx_tiles() and "own tile kernels" in kernel_path(torch.bfloat16)["why"]
    own = block_sparse_attention(q, k, v, support, **kw)
    monkeypatch.setenv("ATTNSIEVE_AMX", "0")
    assert not compiled.amx_tiles() and "oneDNN" in kernel_path(torch.bfloat16)["why"]
    dnn = block_sparse_attention(q, k, v, support, **kw)
    assert own.cells == dnn.cells
    assert_close(own.out.double(), dnn.out.double(), atol=1e-2, rtol=1e-2, what="out own vs oneDNN")
    assert_close(own.lse.double(), dnn.lse.double(), **LSE_TOL, what="lse own vs oneDNN")
    allowed = reference_mask(support, H, Tq, Tk, causal, window, key_valid)
    ref_out, ref_lse = masked_dense_reference(q.double(), k.double(), v.double(), allowed)
    assert_close(own.out.double(), ref_out, **OUT_TOL, what="out")
    assert_close(own.lse.double(), ref_lse, **LSE_TOL, what="lse")


@needs_amx_tiles
@pytest.mark.parametrize("shape", [(4, 1, 1024, 256, 64), (9, 3, 1000, 64, 64), (4, 2, 700, 128, 32)])
def test_amx_planner_makes_the_onednn_planner_choices(shape, monkeypatch):
    """block-topk's bound GEMM on the own tile kernel sums the same bf16 products in the same order
    as oneDNN's: the two planners choose the same blocks and row masks (fixed seeds)."""
    H, Hkv, T, D, bs = shape
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, H, T, D, generator=g).bfloat16()
    k = torch.randn(1, Hkv, T, D, generator=g).bfloat16()
    method, ctx = make("block-topk", density=0.15, block_size=bs), LayerContext(0, D**-0.5)
    monkeypatch.setenv("ATTNSIEVE_AMX", "1")
    own = method.support(q, k, ctx)
    monkeypatch.setenv("ATTNSIEVE_AMX", "0")
    dnn = method.support(q, k, ctx)
    assert torch.equal(own.blocks, dnn.blocks) and torch.equal(own.row_mask, dnn.row_mask)


@pytest.mark.skipif(not compiled.available(), reason="compiled kernels unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_minmax_equals_torch_amax_amin(dtype):
    """The one-pass key-block summaries equal torch's amax / amin: signed zeros, infinities, NaN
    (a NaN channel is NaN in both), strided views (a model's transposed keys)."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 256, 64, generator=g).to(dtype)
    k[0, 1, 5, 7] = float("nan")
    k[1, 2, 70, 3] = float("-inf")
    k[1, 0, 130, 4] = float("inf")
    k[1, 0, :64, 10] = -0.0
    ref = torch.cat([k.view(2, 3, 4, 64, 64).amax(3), k.view(2, 3, 4, 64, 64).amin(3)], -1)
    for view in (k, k.transpose(1, 2).contiguous().transpose(1, 2)):
        out = compiled.module().block_minmax(view, 64)
        assert out.dtype == dtype
        assert torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(out.nan_to_num(), ref.nan_to_num())
        assert torch.equal(out.nan_to_num().signbit(), ref.nan_to_num().signbit())
    with pytest.raises(RuntimeError, match="multiple of bs"):
        compiled.module().block_minmax(k[:, :, :100], 64)

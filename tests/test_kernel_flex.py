"""The FlexAttention backend (kernels/flex.py) against masked dense attention and the compiled C++ kernel.

Eager FlexAttention runs the hypothesis cases of the other backends (it applies the support through
mask_mod over the whole score matrix); compiled FlexAttention (the backend "flex", C++ on this CPU)
runs a few fixed shapes, since each new shape bucket costs a compilation, and must equal the compiled
C++ kernel (out, lse and counted cells); a patched tiny model gives the same logits with backend="flex";
the number of compilations stays bounded across lengths.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_kernels import SETTINGS, qkv, support_to_token_mask

from attnsieve.kernels import BlockSupport, block_grid, block_sparse_attention, flex, token_mask
from attnsieve.kernels.block_sparse import resolve_backend

from helpers import assert_close, masked_dense_reference

needs_flex = pytest.mark.skipif(not flex.available(), reason="torch without FlexAttention")
needs_compiled_flex = pytest.mark.skipif(
    not flex.compiled_available(torch.device("cpu"), torch.float32),
    reason="torch.compile'd FlexAttention does not run on this CPU (needs x86 and a C++ compiler)",
)


def _reference_backend() -> str:
    """The compiled C++ kernel where it runs, else the pure-torch matmul path."""
    try:
        return resolve_backend("compiled", torch.device("cpu"), torch.float32)
    except ValueError:
        return "matmul"


def make_case(B, H, Hkv, Tq, Tk, bs, causal, shared, density, seed, window, row_masks, padded, dtype=torch.float32):
    q, k, v = qkv(B, H, Hkv, Tq, Tk, 16 if bs < 64 else 32, seed, dtype)
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    Hs = Hkv if shared else H
    g = torch.Generator().manual_seed(seed + 1)
    support = BlockSupport.from_mask(torch.rand(B, Hs, n_q, n_k, generator=g) < density, bs)
    if row_masks:
        R = H // Hs * bs
        rm = torch.rand(*support.blocks.shape[:3], R, support.blocks.shape[3], generator=g) < 0.6
        support = BlockSupport(support.blocks, bs, rm)
    key_valid = None
    if padded and B > 1:  # left padding on the first row
        key_valid = torch.ones(B, Tk, dtype=torch.bool)
        key_valid[0, : Tk // 4] = False
    return q, k, v, support, key_valid


def reference(q, k, v, support, causal, window, key_valid):
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    allowed = support_to_token_mask(support, H, Tq, Tk)
    allowed &= token_mask(torch.arange(Tk - Tq, Tk), torch.arange(Tk), causal=causal, window=window)
    if key_valid is not None:
        allowed &= key_valid[:, None, None, :]
        allowed &= key_valid[:, Tk - Tq :][:, None, :, None]
    return masked_dense_reference(q, k, v, allowed)


@st.composite
def flex_case(draw):
    Hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 3]))
    B = draw(st.integers(1, 2))
    Tk = draw(st.sampled_from([1, 5, 63, 64, 65, 130, 257]))
    Tq = draw(st.sampled_from([Tk, max(1, Tk // 3), 1]))
    bs = draw(st.sampled_from([16, 32, 64, 128]))
    return (B, Hkv * G, Hkv, Tq, Tk, bs, draw(st.booleans()), draw(st.booleans()), draw(st.floats(0.0, 1.0)),
            draw(st.integers(0, 10_000)), draw(st.sampled_from([None, None, 1, 20, 100])), draw(st.booleans()),
            True)


@needs_flex
@SETTINGS
@given(flex_case())
def test_flex_eager_equals_masked_dense(case):
    """GQA, windows, padding, row masks, block sizes 16..128, chunks (Tq < Tk) and single queries."""
    B, H, Hkv, Tq, Tk, bs, causal, shared, density, seed, window, row_masks, padded = case
    q, k, v, support, key_valid = make_case(*case)
    res = block_sparse_attention(q, k, v, support, causal=causal, window=window, key_valid=key_valid,
                                 backend="flex-eager")
    ref_out, ref_lse = reference(q, k, v, support, causal, window, key_valid)
    assert_close(res.out, ref_out, what="out")
    assert_close(res.lse, ref_lse, what="lse")
    assert res.cells == B * H * Tq * Tk  # eager computes the whole score matrix, and says so
    assert not torch.isnan(res.out).any() and not torch.isnan(res.lse).any()


COMPILED_CASES = [
    # B, H, Hkv, Tq, Tk, bs, causal, shared, density, seed, window, row_masks, padded
    pytest.param((2, 4, 1, 300, 300, 64, True, True, 0.5, 1, None, False, True), id="gemma-gqa-padded-bs64"),
    pytest.param((1, 6, 2, 100, 257, 32, True, False, 0.6, 2, 40, True, False), id="chunk-window-rowmask-bs32"),
    pytest.param((1, 2, 2, 200, 200, 128, False, True, 0.7, 3, None, False, False), id="bidirectional-bs128"),
]


@needs_compiled_flex
@pytest.mark.parametrize("case", COMPILED_CASES)
def test_flex_compiled_equals_compiled_kernel(case):
    B, H, Hkv, Tq, Tk, bs, causal, shared, density, seed, window, row_masks, padded = case
    q, k, v, support, key_valid = make_case(*case)
    kw = dict(causal=causal, window=window, key_valid=key_valid)
    res = block_sparse_attention(q, k, v, support, backend="flex", **kw)
    ref = block_sparse_attention(q, k, v, support, backend=_reference_backend(), **kw)
    dense_out, dense_lse = reference(q, k, v, support, causal, window, key_valid)
    assert_close(res.out, ref.out, what="out vs compiled")
    assert_close(res.lse, ref.lse, what="lse vs compiled")
    assert_close(res.out, dense_out, what="out vs dense")
    assert_close(res.lse, dense_lse, what="lse vs dense")
    assert res.cells == ref.cells  # counted as every other backend counts: sparse, not the whole matrix
    assert res.cells < B * H * Tq * Tk


@needs_compiled_flex
def test_flex_compiled_bf16_within_its_tolerance():
    case = (1, 4, 1, 256, 256, 64, True, True, 0.5, 5, None, False, False, torch.bfloat16)
    q, k, v, support, _ = make_case(*case)
    res = block_sparse_attention(q, k, v, support, backend="flex")
    ref = block_sparse_attention(q.double(), k.double(), v.double(), support, backend="matmul")
    assert res.out.dtype == torch.bfloat16
    assert_close(res.out.double(), ref.out, atol=2e-2, rtol=2e-2, what="out")
    assert_close(res.lse.double(), ref.lse, atol=2e-2, rtol=2e-2, what="lse")


@needs_compiled_flex
def test_flex_phantom_lse_when_own_key_not_attended():
    """The CPU path's lse reference c is the row's own score; rows whose own block is left out, and
    queries whose scores lie far above it, still get the exact lse (a second pass with a better c)."""
    q, k, v = qkv(1, 2, 1, 128, 128, 32, seed=11)
    k[:, :, :32] *= 40  # the first block's keys: scores far above every query's own
    q[:, :, 64:] *= 4
    blocks = torch.tensor([[0, -1], [0, -1], [1, 0], [3, -1]])[None, None].expand(1, 1, 4, 2)  # no diagonal but 1, 2
    support = BlockSupport(blocks.contiguous(), 32)
    res = block_sparse_attention(q, k, v, support, backend="flex")
    ref_out, ref_lse = reference(q, k, v, support, True, None, None)
    # scores of several hundred: float32 rounding of the scores alone reaches ~1e-5 relative (the
    # check is that no row's lse is off by the phantom's range, tens to hundreds)
    assert_close(res.out, ref_out, atol=1e-3, rtol=1e-3, what="out")
    assert_close(res.lse, ref_lse, atol=1e-3, rtol=1e-5, what="lse")


@needs_compiled_flex
def test_flex_compiles_once_per_bucket_across_lengths():
    """A generate loop (one query over a growing cache) and a grid of prompt lengths reuse compiled graphs."""
    g = torch.Generator().manual_seed(3)
    before = flex.compile_count()
    for Tk in (150, 170, 200, 230, 256):  # 3..4 blocks of 64: one key bucket; prefill, then one decoding step
        for Tq in (Tk, 1):
            q = torch.randn(1, 4, Tq, 32, generator=g)
            k = torch.randn(1, 1, Tk, 32, generator=g)
            v = torch.randn(1, 1, Tk, 32, generator=g)
            first, n_q, n_k = block_grid(Tq, Tk, 64)
            support = BlockSupport.from_mask(torch.rand(1, 1, n_q, n_k, generator=g) < 0.6, 64)
            res = block_sparse_attention(q, k, v, support, backend="flex")
            ref = block_sparse_attention(q, k, v, support, backend="matmul")
            assert_close(res.out, ref.out, what=f"out Tq={Tq} Tk={Tk}")
    # two shapes (prefill bucket, decoding bucket); earlier tests may have compiled them already
    assert flex.compile_count() - before <= 2


def test_unknown_backend_is_rejected_naming_flex():
    q, k, v = qkv(1, 2, 1, 64, 64, 16)
    support = BlockSupport.from_mask(torch.ones(1, 2, 1, 1, dtype=torch.bool), 64)
    with pytest.raises(ValueError, match="backend must be one of auto, .*flex"):
        block_sparse_attention(q, k, v, support, backend="flexx")


def test_flex_on_cuda_is_a_clear_error_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="backend 'flex' needs"):
        resolve_backend("flex", torch.device("cuda"), torch.float32)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) != "flex-eager"


@needs_compiled_flex
def test_patched_tiny_model_with_flex_backend_gives_the_same_logits():
    import attnsieve

    from tiny_models import tiny_gemma3

    model = tiny_gemma3()
    ids = torch.randint(1, 97, (2, 150), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :20] = 0  # a left-padded row
    spec = dict(density=0.4, block_size=32)
    with torch.no_grad():
        with attnsieve.patched(model, "block-topk", **spec) as p:
            ref = model(ids, attention_mask=mask).logits
            ref_density = p.stats.density()
        with attnsieve.patched(model, "block-topk", backend="flex", **spec) as p:
            assert p.backend == "flex"
            out = model(ids, attention_mask=mask).logits
            density = p.stats.density()
    real = mask.bool()
    assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4, what="logits")
    assert density == ref_density < 1.0


def test_patch_rejects_an_unknown_backend():
    import attnsieve

    from tiny_models import tiny_llama

    model = tiny_llama()
    with pytest.raises(ValueError, match="backend must be one of auto, .*flex"):
        attnsieve.patch(model, "block-topk", backend="triton")
    assert getattr(model, "_attnsieve_patch", None) is None  # nothing was patched


@pytest.mark.parametrize("argv", [
    ["bench", "kernel", "--backend", "nope", "--length", "128"],
    ["bench", "prefill", "--backend", "flexx"],
    ["bench", "decode", "--backend", "triton"],
    ["generate", "--prompt", "hi", "--backend", "cuda"],
    ["eval", "--out", "{tmp}/ev", "--backend", "xla"],
], ids=["bench-kernel", "bench-prefill", "bench-decode", "generate", "eval"])
def test_cli_rejects_an_unknown_backend_in_one_line(argv, tmp_path, capsys):
    from attnsieve.cli import main

    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err.startswith("attnsieve: error: backend must be one of auto,") and "flex" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "ev").exists()  # refused before the output folder is claimed


@pytest.mark.parametrize("argv", [
    ["bench", "kernel", "--device", "cuda", "--length", "128"],
    ["generate", "--prompt", "hi", "--device", "cuda"],
    ["bench", "prefill", "--device", "tpu"],
], ids=["bench-kernel-cuda", "generate-cuda", "bench-prefill-tpu"])
def test_cli_device_without_a_gpu_is_one_line(argv, capsys):
    if torch.cuda.is_available() and "cuda" in argv:
        pytest.skip("this machine has a GPU")
    from attnsieve.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "device" in err


def test_load_on_cuda_without_a_gpu_is_a_value_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from attnsieve.models import resolve_device

    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device(None) == torch.device("cpu")

"""The compiled CPU kernels and the MKL batched-GEMM binding against their pure-torch references.

The block-sparse kernel's backends are compared with masked dense attention in test_kernels.py;
here: block-topk's compiled planner makes exactly the torch planner's choices, the switch that
turns the compiled code off works, and the MKL binding refuses offsets outside its tensors.
"""

from __future__ import annotations

import pytest
import torch

from attnsieve.kernels import block_grid, compiled, mkl_batch
from attnsieve.kernels.block_sparse import resolve_backend
from attnsieve.methods import LayerContext, make
from attnsieve.methods.block_topk import BlockTopK

needs_compiled = pytest.mark.skipif(not compiled.available(), reason="compiled CPU kernel unavailable here")
needs_mkl = pytest.mark.skipif(not mkl_batch.available(), reason="torch without MKL")


def own_blocks(support, n_k):
    """[B, Hs, NQ, R, NK] bool: the key blocks each query row attends (union x row mask)."""
    blocks = torch.where(support.blocks >= 0, support.blocks, n_k)
    rows = support.row_mask
    if rows is None:
        rows = torch.ones(*support.blocks.shape[:3], 1, support.blocks.shape[3], dtype=torch.bool)
    own = torch.zeros(*rows.shape[:4], n_k + 1, dtype=torch.bool)
    own.scatter_(4, blocks[:, :, :, None, :].expand_as(rows), rows & (support.blocks >= 0)[:, :, :, None, :])
    return own[..., :n_k]


PLANS = [
    pytest.param(1, 4, 1, 600, 600, 64, dict(density=0.1, block_size=32), False, id="gemma-like"),
    pytest.param(2, 6, 2, 500, 500, 32, dict(density=0.3, block_size=32), True, id="padded-batch"),
    pytest.param(1, 4, 2, 150, 400, 32, dict(density=0.2, block_size=16), False, id="chunk-Tq150-Tk400"),
    pytest.param(1, 4, 2, 400, 400, 32, dict(density=0.15, block_size=32, summary="mean"), False, id="mean"),
    pytest.param(1, 6, 2, 400, 400, 32, dict(density=0.2, block_size=16, per_head=False), False, id="per-group"),
    pytest.param(1, 2, 1, 700, 700, 16, dict(density=0.05, block_size=16, sink_blocks=0, local_blocks=3), False,
                 id="no-sink"),
]


@needs_compiled
@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D,params,padded", PLANS)
def test_block_topk_compiled_plan_makes_the_torch_choices(B, H, Hkv, Tq, Tk, D, params, padded, monkeypatch):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tk, D, generator=g)
    key_valid = None
    if padded:
        key_valid = torch.ones(B, Tk, dtype=torch.bool)
        key_valid[0, : Tk // 3] = False
    method = make("block-topk", **params)
    ctx = LayerContext(0, D**-0.5, key_valid=key_valid)
    fast = method.support(q, k, ctx)
    monkeypatch.setattr(BlockTopK, "use_compiled", False)
    ref = method.support(q, k, ctx)
    n_k = block_grid(Tq, Tk, method.params.block_size)[2]
    assert torch.equal(fast.to_mask(n_k), ref.to_mask(n_k))
    assert torch.equal(own_blocks(fast, n_k), own_blocks(ref, n_k))


def test_compiled_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("ATTNSIEVE_COMPILED", "0")
    compiled.module.cache_clear()
    try:
        assert compiled.module() is None and not compiled.available()
        assert resolve_backend(None, torch.device("cpu"), torch.float32) != "compiled"
        with pytest.raises(ValueError, match="backend 'compiled'"):
            resolve_backend("compiled", torch.device("cpu"), torch.float32)
    finally:
        monkeypatch.delenv("ATTNSIEVE_COMPILED")
        compiled.module.cache_clear()


@needs_mkl
def test_mkl_gemm_batch_multiplies_in_place_and_refuses_foreign_offsets():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, 16, generator=g), torch.randn(40, 16, generator=g)
    c = torch.empty(5, 8, 4)
    a_off = torch.arange(5) * 128
    b_off = torch.tensor([0, 4, 8, 36, 20]) * 16  # row blocks of b, read transposed
    mkl_batch.gemm_batch(a, a_off, 16, b, b_off, 16, c, torch.arange(5) * 32, 4, 8, 4, 16, trans_b=True)
    rows = torch.tensor([0, 4, 8, 36, 20])
    ref = torch.stack([a[i] @ b[rows[i] : rows[i] + 4].T for i in range(5)])
    torch.testing.assert_close(c, ref)
    with pytest.raises(ValueError, match="outside the tensor"):
        mkl_batch.gemm_batch(a, a_off, 16, b, b_off + 16 * 16, 16, c, torch.arange(5) * 32, 4, 8, 4, 16,
                             trans_b=True)
    with pytest.raises(ValueError, match="contiguous"):
        mkl_batch.gemm_batch(a.transpose(1, 2), a_off, 16, b, b_off, 16, c, torch.arange(5) * 32, 4, 8, 4, 16,
                             trans_b=True)


@needs_compiled
def test_block_topk_compiled_plan_reads_strided_queries():
    """A model's queries arrive as a transposed [B, T, H, D] view; the planner reads them in place."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 700, 4, 32, generator=g).transpose(1, 2)
    k = torch.randn(2, 2, 700, 32, generator=g)
    key_valid = torch.ones(2, 700, dtype=torch.bool)
    key_valid[0, :200] = False
    method = make("block-topk", density=0.2, block_size=32)
    ctx = LayerContext(0, 32**-0.5, key_valid=key_valid)
    assert not q.is_contiguous()
    strided, dense = method.support(q, k, ctx), method.support(q.contiguous(), k, ctx)
    assert torch.equal(strided.blocks, dense.blocks) and torch.equal(strided.row_mask, dense.row_mask)


@needs_compiled
@pytest.mark.skipif(torch.cuda.is_available(), reason="the notice is only logged where no CUDA runtime is found")
def test_the_kernel_build_prints_no_cuda_home_notice_on_a_cpu_only_machine():
    """Loading (or building) the CPU kernel in a fresh process leaves stderr free of cpp_extension's
    "No CUDA runtime is found" notice; the filter drops that one message only."""
    import logging
    import subprocess
    import sys

    code = "from attnsieve.kernels import compiled; assert compiled.module() is not None"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "No CUDA runtime" not in res.stderr, res.stderr
    quiet = compiled._CpuOnlyBuild()
    make_record = lambda msg: logging.LogRecord("torch.utils.cpp_extension", logging.WARNING, "", 0, msg, (), None)  # noqa: E731
    assert not quiet.filter(make_record("No CUDA runtime is found, using CUDA_HOME='/usr/local'"))
    assert quiet.filter(make_record("Error building extension"))

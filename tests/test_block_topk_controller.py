"""block-topk's GPU pieces, checked on the CPU: the compiled budget controller equals the Python loop,
and the tensor-core form of the bounds equals the float32 form."""

import pytest
import torch

from attnsieve.kernels import compiled
from attnsieve.methods import LayerContext, make
from attnsieve.methods.block_topk import BlockTopK

ext = compiled.module()
needs_ext = pytest.mark.skipif(ext is None, reason="compiled extension unavailable")


def random_inputs(B, Hs, NQ, k_cap, seed):
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(0, 3, (B, Hs, NQ, k_cap + 1), generator=g, dtype=torch.int32)
    union_size = steps.cumsum(-1).to(torch.int32).contiguous()  # non-decreasing in k, like a union's size
    n_avail = torch.arange(1, NQ + 1).expand(B, NQ).contiguous()  # causal: more candidates further on
    n_forced = torch.minimum(torch.full((B, NQ), 2), n_avail).contiguous()
    budget = torch.randint(1, k_cap + 1, (B, NQ), generator=g).minimum(n_avail).maximum(n_forced).contiguous()
    has_rows = torch.rand(B, Hs, NQ, generator=g) > 0.1
    return union_size, budget, n_forced, n_avail, has_rows


@needs_ext
@pytest.mark.parametrize("seed", range(6))
def test_compiled_controller_equals_python_loop(seed):
    args = random_inputs(2, 3, 40, 12, seed)
    ref = BlockTopK._controller(*args)
    got = ext.block_topk_controller(*args)
    assert torch.equal(got, ref)


@needs_ext
def test_compiled_controller_on_the_method_inputs(monkeypatch):
    """The controller's inputs as the method builds them at density 0.1 (2048 tokens, block 64)."""
    seen = []
    loop = BlockTopK._controller

    def spy(*args):
        seen.append(args)
        return loop(*args)

    monkeypatch.setattr(BlockTopK, "_controller", staticmethod(spy))
    monkeypatch.setattr(BlockTopK, "use_compiled", False)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 2048, 32, generator=g), torch.randn(1, 2, 2048, 32, generator=g)
    make("block-topk", density=0.1).support(q, k, LayerContext(0, 32**-0.5))
    assert len(seen) == 1
    union_size, budget, n_forced, n_avail, has_rows = seen[0]
    args = [union_size.int().contiguous(), *(t.long().contiguous() for t in (budget, n_forced, n_avail)),
            has_rows.contiguous()]
    assert torch.equal(ext.block_topk_controller(*args), loop(*seen[0]))


@needs_ext
def test_compiled_controller_rejects_bad_shapes():
    union_size, budget, n_forced, n_avail, has_rows = random_inputs(1, 2, 8, 4, 0)
    with pytest.raises(RuntimeError, match="budget"):
        ext.block_topk_controller(union_size, budget[:, :4].contiguous(), n_forced, n_avail, has_rows)


@pytest.mark.parametrize("summary", ["minmax", "mean"])
def test_tensor_core_bounds_equal_the_float32_bounds(summary):
    """The GPU form of block-topk's bounds (one matmul over [relu(q), min(q, 0)] x [max, min] in the
    queries' half precision, float32 out) against the float32 form, run here on bf16 values (the
    float32 fallback of the same matmul): equal up to the order of float32 accumulation."""
    from attnsieve.methods.block_topk import block_bounds, key_block_summaries

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 96, 16, generator=g).bfloat16()
    k = torch.randn(1, 2, 256, 16, generator=g).bfloat16()
    kmin, kmax, kmean = key_block_summaries(k, None, 32, 8, mean=summary == "mean")
    if summary == "mean":
        kmax, kmin, kmean = kmean.bfloat16().float(), None, None  # the GPU form rounds the mean to bf16
    ref = block_bounds(q, kmax, kmin, tensor_cores=False)
    got = block_bounds(q, kmax, kmin, tensor_cores=True)
    assert got.dtype == torch.float32 and got.shape == ref.shape == (1, 2, 96, 8)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)

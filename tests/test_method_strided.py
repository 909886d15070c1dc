"""S2-Attention strided shards: per-head formula, union coverage, execution, density knob."""

from __future__ import annotations

import pytest
import torch
from test_method_power import block_mask_to_tokens, qkv

from attnsieve.kernels import exact_cells
from attnsieve.methods import LayerContext, make

from helpers import assert_close, masked_dense_reference


def naive_shard(n_blocks, H, h, local, stride, offset, sink):
    """Head h's key blocks for each query block, by DKernel's rule written out as a loop."""
    step = max(1, stride // H)
    rows = []
    for j in range(n_blocks):
        rows.append({kb for kb in range(j + 1)
                     if j - kb < local or (kb + h * step + offset) % stride == 0 or kb < sink})
    return rows


@pytest.mark.parametrize("H,local,stride,offset,sink", [(4, 2, 8, 0, 0), (4, 1, 3, 1, 1), (2, 4, 5, 2, 0),
                                                          (8, 1, 4, 0, 1)])
def test_each_head_follows_the_dkernel_formula(H, local, stride, offset, sink):
    q, k, _ = qkv(H=H, T=700)
    method = make("strided", block_size=16, local_blocks=local, stride=stride, head_offset=offset, sink_blocks=sink)
    support = method.support(q, k, LayerContext(0, 0.25))
    assert support.blocks.shape[1] == H  # one list per query head, although there is one KV head
    mask = support.to_mask(44)[0]
    for h in range(H):
        got = [set(torch.nonzero(row).flatten().tolist()) for row in mask[h]]
        assert got == naive_shard(44, H, h, local, stride, offset, sink), f"head {h}"


@pytest.mark.parametrize("H,Hkv,stride", [(4, 1, 4), (4, 1, 2), (8, 2, 4), (4, 4, 1)])
def test_union_of_a_groups_heads_covers_every_causal_block(H, Hkv, stride):
    q, k, _ = qkv(H=H, Hkv=Hkv, T=640)
    G = H // Hkv
    method = make("strided", block_size=16, local_blocks=1, stride=stride, sink_blocks=0)
    mask = method.support(q, k, LayerContext(0, 0.25)).to_mask(40)[0]  # [H, NQ, NK]
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    for g in range(Hkv):
        union = mask[g * G : (g + 1) * G].any(0)
        assert torch.equal(union, causal), f"group {g}"
        if stride > 1:  # and no single head sees everything: the context is sharded
            assert all(not torch.equal(mask[h], causal) for h in range(g * G, (g + 1) * G))


def test_more_stride_than_heads_spreads_the_offsets():
    # DKernel: with stride 8 and 4 heads, offsets step by 2 (heads own residues 0, 6, 4, 2).
    q, k, _ = qkv(H=4, T=16 * 24)
    mask = make("strided", block_size=16, local_blocks=1, stride=8, sink_blocks=0).support(
        q, k, LayerContext(0, 0.25)).to_mask(24)[0]
    last = [set(torch.nonzero(mask[h, 23, :23]).flatten().tolist()) for h in range(4)]
    assert last == [{0, 8, 16}, {6, 14, 22}, {4, 12, 20}, {2, 10, 18}]


@pytest.mark.parametrize("heads", [(4, 1), (4, 2)], ids=["GQA", "GQA2"])
@pytest.mark.parametrize("window", [None, 90], ids=["global", "sliding90"])
def test_execution_equals_masked_dense(heads, window):
    q, k, v = qkv(H=heads[0], Hkv=heads[1], T=400, seed=4)
    method = make("strided", block_size=16, local_blocks=2, stride=3, sink_blocks=1)
    ctx = LayerContext(0, 0.25, window)
    res = method.prefill(q, k, v, ctx)
    allowed = block_mask_to_tokens(method.support(q, k, ctx).to_mask(25), 400, 400, 16, window)  # per query head
    ref, _ = masked_dense_reference(q, k, v, allowed, scale=0.25)
    assert_close(res.out, ref)
    assert res.cells == int(allowed.sum())


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_knob_lands_near_target(density):
    q, k, v = qkv(T=2048, D=8, seed=5)
    res = make("strided", density=density).prefill(q, k, v, LayerContext(0, 0.3))
    measured = res.cells / (4 * exact_cells(2048, 2048))
    assert 0.7 * density <= measured <= 1.3 * density, measured
    assert res.estimate_s < 0.5  # static: no scores are computed to choose the pattern


@pytest.mark.parametrize("key,value", [("block_size", 600), ("local_blocks", 0), ("stride", 0),
                                       ("head_offset", -1), ("sink_blocks", -2), ("density", 1.5)])
def test_bad_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make("strided", **{key: value})

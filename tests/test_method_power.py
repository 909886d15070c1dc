"""PowerAttention: the block pattern against a naive list of distances, execution, density knob."""

from __future__ import annotations

import pytest
import torch

from attnsieve.kernels import block_grid, exact_cells, token_mask
from attnsieve.methods import LayerContext, make
from attnsieve.methods._static import pair_cells
from attnsieve.methods.power import PowerParams, calibrate

from helpers import assert_close, masked_dense_reference


def qkv(B=1, H=4, Hkv=1, T=300, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g),
            torch.randn(B, Hkv, T, D, generator=g))


def naive_power_blocks(n_blocks: int, local: int, sink: int) -> list[set[int]]:
    """Key blocks of each query block, listed by hand: local window, sink, powers of two back."""
    out = []
    for j in range(n_blocks):
        keep = {kb for kb in range(j + 1) if j - kb < local or kb < sink}
        p = 1
        while p <= j:
            keep.add(j - p)
            p *= 2
        out.append(keep)
    return out


def block_mask_to_tokens(block_mask, Tq, Tk, bs, window=None, key_valid=None):
    """[B, Hs, NQ, NK] block mask -> [B, Hs, Tq, Tk] token mask (causal, window, padding)."""
    first, _, _ = block_grid(Tq, Tk, bs)
    q_blk = (torch.arange(Tk - Tq, Tk) // bs) - first
    k_blk = torch.arange(Tk) // bs
    m = block_mask[:, :, q_blk][:, :, :, k_blk]
    m = m & token_mask(torch.arange(Tk - Tq, Tk), torch.arange(Tk), causal=True, window=window)
    if key_valid is not None:
        m = m & key_valid[:, None, None, :] & key_valid[:, None, Tk - Tq :, None]
    return m


@pytest.mark.parametrize("T,bs,local,sink", [(300, 16, 5, 1), (1000, 16, 1, 0), (1000, 32, 3, 2), (63, 16, 5, 1)])
def test_pattern_equals_naive_power_of_two_distances(T, bs, local, sink):
    q, k, _ = qkv(T=T)
    method = make("power", block_size=bs, local_blocks=local, sink_blocks=sink)
    mask = method.support(q, k, LayerContext(0, 0.25)).to_mask(-(-T // bs))[0, 0]
    expected = naive_power_blocks(-(-T // bs), local, sink)
    assert [set(torch.nonzero(row).flatten().tolist()) for row in mask] == expected


def test_last_block_sees_exponentially_spaced_blocks():
    q, k, _ = qkv(T=64 * 16)
    mask = make("power", block_size=16, local_blocks=1, sink_blocks=0).support(q, k, LayerContext(0, 0.25))
    row = torch.nonzero(mask.to_mask(64)[0, 0, 63]).flatten().tolist()
    assert row == [63 - d for d in (32, 16, 8, 4, 2, 1, 0)]


@pytest.mark.parametrize("heads", [(4, 1), (4, 2)], ids=["GQA", "GQA2"])
@pytest.mark.parametrize("window", [None, 100], ids=["global", "sliding100"])
def test_execution_equals_masked_dense(heads, window):
    q, k, v = qkv(H=heads[0], Hkv=heads[1], T=500, seed=1)
    method = make("power", block_size=16, local_blocks=2, sink_blocks=1)
    ctx = LayerContext(0, 0.25, window)
    res = method.prefill(q, k, v, ctx)
    blocks = method.support(q, k, ctx).to_mask(32)  # [1, Hkv, NQ, NK]
    allowed = block_mask_to_tokens(blocks, 500, 500, 16, window).repeat_interleave(heads[0] // heads[1], dim=1)
    ref, _ = masked_dense_reference(q, k, v, allowed, scale=0.25)
    assert_close(res.out, ref)
    assert res.cells == int(allowed.sum())


def test_sink_follows_left_padding():
    q, k, v = qkv(B=2, T=200, seed=2)
    valid = torch.ones(2, 200, dtype=torch.bool)
    valid[1, :40] = False  # row 1's first real block is block 2 (of 16 tokens)
    method = make("power", block_size=16, local_blocks=1, sink_blocks=1)
    ctx = LayerContext(0, 0.25, key_valid=valid)
    blocks = method.support(q, k, ctx).to_mask(13)
    assert bool(blocks[0, 0, 12, 0]) and not bool(blocks[1, 0, 12, 0]) and bool(blocks[1, 0, 12, 2])
    res = method.prefill(q, k, v, ctx)
    allowed = block_mask_to_tokens(blocks, 200, 200, 16, key_valid=valid).expand(-1, 4, -1, -1)
    ref, _ = masked_dense_reference(q, k, v, allowed, scale=0.25)
    assert_close(res.out[0], ref[0])
    assert_close(res.out[1, :, 40:], ref[1, :, 40:])


@pytest.mark.parametrize("Tq,Tk,bs,window", [(1, 1, 16, None), (63, 63, 16, None), (300, 300, 16, 40),
                                             (20, 90, 16, None), (20, 90, 16, 25), (130, 130, 32, 7)])
def test_pair_cells_counts_the_exact_layer_cells_of_each_block_pair(Tq, Tk, bs, window):
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    allowed = token_mask(torch.arange(Tk - Tq, Tk), torch.arange(Tk), causal=True, window=window)
    ref = torch.zeros(n_q, n_k, dtype=torch.long)
    for i, t in torch.nonzero(allowed).tolist():
        ref[(Tk - Tq + i) // bs - first, t // bs] += 1
    assert torch.equal(pair_cells(Tq, Tk, bs, window), ref)
    assert int(ref.sum()) == exact_cells(Tq, Tk, window=window)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_knob_lands_near_target(density):
    q, k, v = qkv(T=2048, D=8, H=2, seed=3)
    res = make("power", density=density).prefill(q, k, v, LayerContext(0, 0.3))
    measured = res.cells / (2 * exact_cells(2048, 2048))
    assert 0.7 * density <= measured <= 1.3 * density, measured
    assert res.estimate_s < 0.5  # static: no scores are computed to choose the pattern


def test_density_scales_the_grid_and_keeps_the_paper_shape():
    # At 4k a 0.2 budget does not fit the paper's 256-token grid: the grid is refined until the
    # paper-shaped pattern (5 local blocks + sink + powers) fits, and local blocks are then added.
    bs, local = calibrate(4096, 4096, None, PowerParams(density=0.2))
    assert bs < 256 and local >= 5
    assert calibrate(4096, 4096, None, PowerParams(density=1.0))[0] == 256  # dense fits the paper's grid


@pytest.mark.parametrize("key,value", [("block_size", 8), ("local_blocks", 0), ("sink_blocks", -1), ("density", 0.0)])
def test_bad_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make("power", **{key: value})

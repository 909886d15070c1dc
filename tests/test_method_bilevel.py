"""bilevel (BiFormer routing): selection against a naive loop, planted region, masked dense, density."""

from __future__ import annotations

import math

import pytest
import torch

from attnsieve.kernels import exact_cells
from attnsieve.methods import make

from block_routing_helpers import ctx_for, qkv, token_mask_from_blocks
from helpers import assert_close, masked_dense_reference


def naive_routing_mask(q, k, valid, bs, routed, per_head, sink=0, causal=True):
    """BiFormer's routing written as loops: [B, Hs, NQ, NK] bool (Tq == Tk, no window).

    causal=False follows BiFormer (Zhu et al., CVPR 2023; rayleizhu/BiFormer, ops/bra_legacy.py,
    `TopkRouting`): 1. region query / key = mean of the region's queries / keys; 2. affinity
    q_r . k_r (summed over heads when the routing is shared); 3. each query region keeps its top
    `routed` key regions, its own included, here restricted to the regions at or before it (a causal
    LM; the token mask applies inside). causal=True: the query of region j is region j - 1's mean and
    the diagonal region is added on top.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    n = math.ceil(T / bs)
    Hs = H if per_head else Hkv
    mask = torch.zeros(B, Hs, n, n, dtype=torch.bool)
    for b in range(B):
        def k_mean(g, i, b=b):
            sel = valid[b, i * bs : (i + 1) * bs]
            return k[b, g, i * bs : (i + 1) * bs][sel].double().mean(0) if sel.any() else None

        def q_route(h, j, b=b):  # mean of the previous region's real queries, else the region's first
            if not causal:  # BiFormer: the region's own real queries
                rows = valid[b, j * bs : (j + 1) * bs]
                return q[b, h, j * bs : (j + 1) * bs][rows].double().mean(0)
            if j > 0 and valid[b, (j - 1) * bs : j * bs].any():
                return q[b, h, (j - 1) * bs : j * bs][valid[b, (j - 1) * bs : j * bs]].double().mean(0)
            rows = valid[b, j * bs : (j + 1) * bs]
            return q[b, h, j * bs + (int(torch.nonzero(rows)[0]) if rows.any() else 0)].double()

        for s in range(Hs):
            heads = [s] if per_head else list(range(H))  # shared routing sums every head
            real = [i for i in range(n) if k_mean(0, i) is not None]
            sinks = real[:sink]
            for j in range(n):
                if not valid[b, j * bs : (j + 1) * bs].any():
                    continue
                scored = []
                for i in range(j if causal else j + 1):
                    if k_mean(0, i) is None:
                        continue
                    if i in sinks:
                        mask[b, s, j, i] = True
                        continue
                    aff = sum(float(q_route(h, j) @ k_mean(h * Hkv // H, i)) for h in heads)
                    scored.append((aff, i))
                for _, i in sorted(scored, reverse=True)[:routed]:
                    mask[b, s, j, i] = True
                if causal:
                    mask[b, s, j, j] = True
    return mask


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize("heads", [(4, 1), (4, 2)], ids=["MQA", "GQA2"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("sink", [0, 1])
@pytest.mark.parametrize("causal", [False, True], ids=["paper", "causal"])
def test_selection_equals_naive_loop(per_head, heads, padded, sink, causal):
    q, k, _ = qkv(B=2, H=heads[0], Hkv=heads[1], T=150, seed=1)
    valid = torch.ones(2, 150, dtype=torch.bool)
    if padded:
        valid[1, :37] = False
    m = make("bilevel", topk=3, block_size=16, per_head=per_head, sink_blocks=sink, causal=causal)
    sup = m.support(q, k, ctx_for(q, valid if padded else None))
    got = sup.to_mask(10)
    ref = naive_routing_mask(q, k, valid, 16, 3, per_head, sink, causal)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("causal", [False, True], ids=["paper", "causal"])
def test_default_topk_is_biformers_fraction_of_candidates(causal):
    q, k, _ = qkv(T=64 * 40, D=8, seed=2)
    sup = make("bilevel", sink_blocks=0, causal=causal).support(q, k, ctx_for(q))
    kept = (sup.blocks >= 0).sum(-1)[0, 0]  # [NQ]
    if causal:  # candidates before the diagonal, the diagonal on top
        assert torch.equal(kept, torch.ceil(torch.arange(40) * 4 / 49 - 1e-9).long() + 1)
    else:  # BiFormer: a fraction of every region it may route to, its own included
        assert torch.equal(kept, torch.ceil(torch.arange(1, 41) * 4 / 49 - 1e-9).long())


def test_planted_region_is_routed():
    """Late queries share a direction with one far region's keys: that region gets routed."""
    q, k, v = qkv(T=1024, D=32, seed=3)
    u = torch.randn(32)
    q[:, :, 600:] += 3 * u
    k[:, :, 128:192] += 3 * u  # region 2 (block_size 64)
    sup = make("bilevel", topk=1, sink_blocks=0, causal=True).support(q, k, ctx_for(q))
    mask = sup.to_mask(16)[0, 0]
    assert bool(mask[11:, 2].all())  # every region from 11 on (lagged query fully past 600) routes to 2
    # the paper's own-region query: written out, regions 10..15 (all queries past 600) keep region 2 as
    # their one routed region
    mask = make("bilevel", topk=1, sink_blocks=0).support(q, k, ctx_for(q)).to_mask(16)[0, 0]
    assert [int(torch.nonzero(mask[j])[0]) for j in range(10, 16)] == [2] * 6 and mask[10:].sum() == 6


@pytest.mark.parametrize("causal", [False, True], ids=["paper", "causal"])
@pytest.mark.parametrize("window", [None, 70])
def test_execution_equals_masked_dense(window, causal):
    q, k, v = qkv(B=2, T=200, seed=4)
    valid = torch.ones(2, 200, dtype=torch.bool)
    valid[0, :23] = False
    m = make("bilevel", topk=2, block_size=16, causal=causal)
    ctx = ctx_for(q, valid, window)
    res = m.prefill(q, k, v, ctx)
    mask = token_mask_from_blocks(m.support(q, k, ctx).to_mask(13), 4, 200, 16, valid)
    if window is not None:
        pos = torch.arange(200)
        mask &= (pos[:, None] - pos[None, :] < window)
    ref, _ = masked_dense_reference(q, k, v, mask)
    rows = mask.any(-1)
    assert_close(res.out[rows], ref[rows])
    assert res.cells == int(mask.sum())


@pytest.mark.parametrize("causal", [False, True], ids=["paper", "causal"])
@pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.4])
def test_density_lands_near_target(density, causal):
    q, k, v = qkv(T=4096, D=32, seed=5)
    res = make("bilevel", density=density, causal=causal).prefill(q, k, v, ctx_for(q))
    measured = res.cells / (4 * exact_cells(4096, 4096))
    assert 0.9 * density <= measured <= 1.1 * density + 0.01, measured


@pytest.mark.parametrize("key,value", [("topk", -1), ("topk_ratio", 0.0), ("density", 1.5), ("block_size", 8),
                                       ("sink_blocks", -1)])
def test_bad_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make("bilevel", **{key: value})

"""AnchorAttention: anchors and stripes against naive loops, a planted stripe, exactness of the plan, density."""

from __future__ import annotations

import pytest
import torch

from attnsieve.kernels import block_grid, dense_attention, exact_cells
from attnsieve.methods import LayerContext, make

from helpers import assert_close, masked_dense_reference


def plan_mask(plan, H, Tq, Tk, bs):
    """[B, H, Tq, Tk] bool: the support's blocks plus the listed stripes, by loops (slow and obvious)."""
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    blocks = plan.support.to_mask(n_k)
    B, Hs = blocks.shape[:2]
    mask = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            hs = h * Hs // H
            for i in range(Tq):
                j = (Tk - Tq + i) // bs - first
                for kb in torch.nonzero(blocks[b, hs, j]).flatten().tolist():
                    mask[b, h, i, kb * bs : (kb + 1) * bs] = True
                if plan.tokens is not None:
                    for t in plan.tokens[b, hs, j].tolist():
                        if t >= 0:
                            mask[b, h, i, t] = True
    return mask & torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)


def correlated_qkv(B=1, H=4, Hkv=1, T=512, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    q = q[:, :, :1] + 0.5 * q  # neighbouring queries correlate, as in real models
    return q, torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)


def test_anchors_are_row_maxima_over_initial_and_local_blocks():
    q, k, _ = correlated_qkv(T=200, seed=1)
    bs, step, scale = 16, 2, 32**-0.5
    plan = make("anchor", block_size=bs, step=step, theta=3.0).plan(q, k, LayerContext(0, scale))
    for h in range(4):
        for p in range(200):
            group_start = (p // bs // step) * step * bs
            keys = sorted(set(range(min(step * bs, p + 1))) | set(range(group_start, p + 1)))
            expected = (k[0, 0, keys] @ q[0, h, p] * scale).max()
            assert abs(float(plan.anchors[0, h, p]) - float(expected)) < 1e-4, (h, p)


def test_stripes_follow_the_lagged_pooled_margin_rule():
    """Group g keeps key t (between the initial region and the group) iff some block of group g - 1 has
    pooled anchor - pooled score <= theta; checked by loops."""
    q, k, _ = correlated_qkv(T=320, seed=2)
    bs, step, theta, scale = 16, 2, 2.0, 32**-0.5
    plan = make("anchor", block_size=bs, step=step, theta=theta).plan(q, k, LayerContext(0, scale))
    G = bs * step
    for h in range(4):
        for g in range(2, 320 // G):
            want = set()
            for blk in range((g - 1) * step, g * step):
                qbar = q[0, h, blk * bs : (blk + 1) * bs].mean(0)
                abar = plan.anchors[0, h, blk * bs : (blk + 1) * bs].mean()
                for t in range(G, g * G):
                    if abar - float(k[0, 0, t] @ qbar) * scale <= theta:
                        want.add(t)
            got = {t for t in plan.tokens[0, h, g * step].tolist() if t >= 0}
            assert got == want, (h, g, sorted(got ^ want))


def test_planted_stripe_is_kept():
    q, k, v = correlated_qkv(T=1024, D=64, seed=3)
    q = q[:, :1, :1] + 0.5 * q  # all heads share a direction
    k[:, :, 300] = q[:, :, 600:].mean((1, 2)) * 4  # a key every later query scores highly
    method = make("anchor", block_size=32, theta=1.0)
    plan = method.plan(q, k, LayerContext(0, 0.125))
    assert plan.step == 1  # groups of one 32-token block at this length
    # key 300 lies in block 9; blocks 10 on choose it from the pooled query of the block before them
    assert bool((plan.tokens[0, :, 10:] == 300).any(-1).all())
    candidates = 4 * sum(j * 32 - 32 for j in range(2, 32))
    assert int((plan.tokens >= 0).sum()) < 0.2 * candidates  # few other keys come within theta
    res = method.prefill(q, k, v, LayerContext(0, 0.125))
    ref, _ = dense_attention(q, k, v, scale=0.125)
    err = (res.out[:, :, -1] - ref[:, :, -1]).norm() / ref[:, :, -1].norm()
    assert err < 0.05, float(err)


@pytest.mark.parametrize("heads", [(4, 1), (2, 2)], ids=["GQA", "MHA"])
@pytest.mark.parametrize("params", [{"theta": 1.5}, {"density": 0.3, "step": 2}], ids=["theta", "density"])
def test_executed_attention_equals_masked_dense_of_the_plan(heads, params):
    H, Hkv = heads
    T, bs = 300, 16
    q, k, v = correlated_qkv(B=2, H=H, Hkv=Hkv, T=T, D=16, seed=4)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :45] = False
    ctx = LayerContext(0, 0.25, None, valid)
    method = make("anchor", block_size=bs, **params)
    plan = method.plan(q, k, ctx)
    assert plan.tokens is not None and bool((plan.tokens >= 0).any())
    res = method.prefill(q, k, v, ctx)
    mask = plan_mask(plan, H, T, T, bs) & valid[:, None, None, :]
    ref, _ = masked_dense_reference(q, k, v, mask, scale=0.25)
    rows = mask.any(-1) & valid[:, None, :]
    assert_close(res.out[rows], ref[rows])
    assert res.cells == int(mask[rows[..., None].expand_as(mask)].sum())


def test_chunked_prefill_call_with_fewer_queries_than_keys():
    q, _, _ = correlated_qkv(H=2, T=100, D=16, seed=5)
    _, k, v = correlated_qkv(H=2, T=260, D=16, seed=6)
    ctx = LayerContext(0, 0.25)
    method = make("anchor", block_size=16, theta=1.0)
    plan = method.plan(q, k, ctx)
    res = method.prefill(q, k, v, ctx)
    mask = plan_mask(plan, 2, 100, 260, 16)
    ref, _ = masked_dense_reference(q, k, v, mask, scale=0.25)
    assert_close(res.out, ref)


def test_large_theta_keeps_every_key():
    q, k, v = correlated_qkv(T=300, seed=7)
    res = make("anchor", block_size=16, theta=1e9).prefill(q, k, v, LayerContext(0, 32**-0.5))
    ref, _ = dense_attention(q, k, v)
    assert_close(res.out, ref)
    assert res.cells == 4 * exact_cells(300, 300)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_lands_near_target(density):
    q, k, v = correlated_qkv(T=2048, D=64, seed=8)
    res = make("anchor", block_size=64, density=density).prefill(q, k, v, LayerContext(0, 0.125))
    measured = res.cells / (4 * exact_cells(2048, 2048))
    assert 0.7 * density <= measured <= 1.3 * density + 0.02, measured


@pytest.mark.parametrize("key,value", [("theta", 0.0), ("step", 0), ("density", 1.5), ("block_size", 1024)])
def test_bad_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make("anchor", **{key: value})

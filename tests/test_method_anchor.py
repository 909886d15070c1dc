"""AnchorAttention: anchors and stripes (paper and lagged) against naive loops, planted stripes, exactness, density."""

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
    plan = make("anchor", block_size=bs, step=step, theta=theta, causal=True).plan(q, k, LayerContext(0, scale))
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


def naive_anchor_attention(q, k, bs, step, theta, scale):
    """The keys each query attends in AnchorAttention, loop by loop: [B, H, T, T] bool (one batch row, Tq == Tk).

    Follows the authors' AnchorAttn code, `anchorattn` -> `_run_anchorattn` (init_cnt = local_cnt = 1):
    1. `get_mask_fused_anchor_triton`: query p of group g = p // (step * bs) attends, causally, the initial region
       [0, step * bs) and its group [g * step * bs, p]; its anchor is the largest scaled score there;
    2. `get_q_mask_triton` (and its PyTorch twin `get_mask_block`): for each block j of group g, pooled query =
       mean of the block's queries, pooled anchor = mean of their anchors; key t in [bs, g * step * bs - bs) is a
       stripe of group g when scale * pooled_q_j . k_t + theta >= pooled_anchor_j for some block j of the group;
    3. `_triton_stripe_sparse_attn_fwd_kernel_step3`: every query of group g adds the group's stripes.
    Each query head scores its own KV head (GQA: head h reads KV head h // (H / Hkv); the reference repeats KV).
    A partial last block pools the queries it has (the reference asserts T % (step * bs) == 0).
    """
    _, H, T, _ = q.shape
    G = H // k.shape[1]
    group = step * bs
    mask = torch.zeros(1, H, T, T, dtype=torch.bool)
    for h in range(H):
        kh = k[0, h // G].double()
        anchors = []
        for p in range(T):
            g = p // group
            keys = sorted(set(range(min(group, p + 1))) | set(range(g * group, p + 1)))
            mask[0, h, p, keys] = True
            anchors.append(float((kh[keys] @ q[0, h, p].double()).max()) * scale)
        for g in range(-(-T // group)):
            stripes = set()
            for j in range(g * step, min((g + 1) * step, -(-T // bs))):
                rows = range(j * bs, min((j + 1) * bs, T))
                qbar = q[0, h, list(rows)].double().mean(0)
                abar = sum(anchors[p] for p in rows) / len(rows)
                stripes |= {t for t in range(bs, g * group - bs) if float(kh[t] @ qbar) * scale + theta >= abar}
            for p in range(g * group, min((g + 1) * group, T)):
                mask[0, h, p, sorted(stripes)] = True
    return mask


@pytest.mark.parametrize("T", [512, 500])
@pytest.mark.parametrize("heads", [(4, 1), (4, 2)], ids=["GQA", "GQA2"])
def test_paper_selection_equals_reference_loop(T, heads):
    H, Hkv = heads
    q, k, _ = correlated_qkv(H=H, Hkv=Hkv, T=T, D=16, seed=12)
    bs, step, theta, scale = 16, 4, 1.0, 0.25
    method = make("anchor", block_size=bs, step=step, theta=theta)
    assert method.params.causal is False
    plan = method.plan(q, k, LayerContext(0, scale))
    got = plan_mask(plan, H, T, T, bs)
    ref = naive_anchor_attention(q, k, bs, step, theta, scale)
    assert 0.2 < float(ref.sum() / torch.ones(T, T).tril().sum() / H) < 0.9, "the test must select stripes"
    for h in range(H):
        for p in range(T):
            assert torch.equal(got[0, h, p], ref[0, h, p]), (h, p, torch.nonzero(got[0, h, p] ^ ref[0, h, p]))


def test_paper_selection_of_a_planted_pattern():
    """Written out by hand: only the question block (15, the last 32 queries) keeps key 100 as a stripe.

    Every query shares a direction with a sink key 0, so every anchor is about 8 nats; key 100 scores 12 with the
    question's queries and about 0 with all others, random keys score about 0: with theta 4, only the question's
    own pooled query brings key 100 (8 - 12 <= 4) and no other stripe passes (8 - 0 > 4)."""
    T, bs, D = 512, 32, 32
    g = torch.Generator().manual_seed(13)
    u, w = torch.eye(D)[0], torch.eye(D)[1]
    q, k = 0.1 * torch.randn(1, 1, T, D, generator=g), 0.1 * torch.randn(1, 1, T, D, generator=g)
    q[..., 0] = 0.0  # no query but the question's has a component along u
    scale = D**-0.5
    q += w * 8 / (4 * D**0.5 * scale)  # every query: w, and the sink key 0 along w scores 8
    k[:, :, 0] = 4 * D**0.5 * w
    k[:, :, 100] = 4 * D**0.5 * u
    q[:, :, -32:] += 3 * u  # the question: 3 u . 4 sqrt(D) u * scale = 12
    method = make("anchor", block_size=bs, step=1, theta=4.0)
    plan = method.plan(q, k, LayerContext(0, scale))
    n_k = T // bs
    blocks = plan.support.to_mask(n_k)[0, 0]
    tokens = [sorted(t for t in plan.tokens[0, 0, j].tolist() if t >= 0) for j in range(n_k)]
    # the question block: its initial block 0, its own block 15, and the stripe key 100
    assert set(torch.nonzero(blocks[15]).flatten().tolist()) == {0, 15} and tokens[15] == [100]
    for j in range(1, 15):  # every other block: its initial and own blocks, no stripe
        assert set(torch.nonzero(blocks[j]).flatten().tolist()) == {0, j} and tokens[j] == [], j
    # the leak-free form chooses block 15's stripes with block 14's pooled queries, which ignore key 100
    lagged = make("anchor", block_size=bs, step=1, theta=4.0, causal=True).plan(q, k, LayerContext(0, scale))
    assert lagged.tokens is None or 100 not in lagged.tokens[0, 0, 15].tolist()


def test_defaults_are_the_references_unscaled():
    """block_size 128, step 16, theta 12 at every length: a group is 2048 tokens, so at 4k every key lies in the
    initial region or the local window (dense), and at 6k the third group chooses stripes."""
    p = make("anchor").params
    assert (p.block_size, p.step, p.theta, p.causal) == (128, None, 12.0, False)
    q, k, v = correlated_qkv(H=1, T=4096, D=16, seed=14)
    plan = make("anchor").plan(q, k, LayerContext(0, 0.25))
    assert plan.step == 16 and plan.tokens is None
    res = make("anchor").prefill(q, k, v, LayerContext(0, 0.25))
    assert res.cells == exact_cells(4096, 4096)
    q, k, _ = correlated_qkv(H=1, T=6144, D=16, seed=14)
    plan = make("anchor").plan(q, k, LayerContext(0, 0.25))
    assert plan.step == 16 and plan.theta[:2] == [None, None] and plan.theta[2] is not None


def test_lagged_planted_stripe_is_kept():
    q, k, v = correlated_qkv(T=1024, D=64, seed=3)
    q = q[:, :1, :1] + 0.5 * q  # all heads share a direction
    k[:, :, 300] = q[:, :, 600:].mean((1, 2)) * 4  # a key every later query scores highly
    method = make("anchor", block_size=32, theta=1.0, step=1, causal=True)
    plan = method.plan(q, k, LayerContext(0, 0.125))
    assert plan.step == 1  # groups of one 32-token block
    # key 300 lies in block 9; blocks 10 on choose it from the pooled query of the block before them
    assert bool((plan.tokens[0, :, 10:] == 300).any(-1).all())
    candidates = 4 * sum(j * 32 - 32 for j in range(2, 32))
    assert int((plan.tokens >= 0).sum()) < 0.2 * candidates  # few other keys come within theta
    res = method.prefill(q, k, v, LayerContext(0, 0.125))
    ref, _ = dense_attention(q, k, v, scale=0.125)
    err = (res.out[:, :, -1] - ref[:, :, -1]).norm() / ref[:, :, -1].norm()
    assert err < 0.05, float(err)


@pytest.mark.parametrize("causal", [False, True], ids=["paper", "causal"])
@pytest.mark.parametrize("heads", [(4, 1), (2, 2)], ids=["GQA", "MHA"])
@pytest.mark.parametrize("params", [{"theta": 1.5, "step": 2}, {"density": 0.3, "step": 2}], ids=["theta", "density"])
def test_executed_attention_equals_masked_dense_of_the_plan(heads, params, causal):
    H, Hkv = heads
    T, bs = 300, 16
    q, k, v = correlated_qkv(B=2, H=H, Hkv=Hkv, T=T, D=16, seed=4)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :45] = False
    ctx = LayerContext(0, 0.25, None, valid)
    method = make("anchor", block_size=bs, causal=causal, **params)
    plan = method.plan(q, k, ctx)
    assert plan.tokens is not None and bool((plan.tokens >= 0).any())
    res = method.prefill(q, k, v, ctx)
    mask = plan_mask(plan, H, T, T, bs) & valid[:, None, None, :]
    ref, _ = masked_dense_reference(q, k, v, mask, scale=0.25)
    rows = mask.any(-1) & valid[:, None, :]
    assert_close(res.out[rows], ref[rows])
    assert res.cells == int(mask[rows[..., None].expand_as(mask)].sum())


@pytest.mark.parametrize("causal", [False, True], ids=["paper", "causal"])
def test_chunked_prefill_call_with_fewer_queries_than_keys(causal):
    q, _, _ = correlated_qkv(H=2, T=100, D=16, seed=5)
    _, k, v = correlated_qkv(H=2, T=260, D=16, seed=6)
    ctx = LayerContext(0, 0.25)
    method = make("anchor", block_size=16, theta=1.0, step=1, causal=causal)
    plan = method.plan(q, k, ctx)
    assert plan.tokens is not None and bool((plan.tokens >= 0).any())
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


@pytest.mark.parametrize("causal", [False, True], ids=["paper", "causal"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_lands_near_target(density, causal):
    q, k, v = correlated_qkv(T=2048, D=64, seed=8)
    res = make("anchor", block_size=64, density=density, causal=causal).prefill(q, k, v, LayerContext(0, 0.125))
    measured = res.cells / (4 * exact_cells(2048, 2048))
    assert 0.7 * density <= measured <= 1.3 * density + 0.02, measured


@pytest.mark.parametrize("key,value", [("theta", 0.0), ("step", 0), ("density", 1.5), ("block_size", 1024)])
def test_bad_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make("anchor", **{key: value})

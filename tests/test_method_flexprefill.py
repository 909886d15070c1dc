"""FlexPrefill: the pattern decision, gamma coverage against naive loops, exactness of the executed plan, density."""

from __future__ import annotations

import pytest
import torch

from attnsieve.kernels import block_grid, dense_attention, exact_cells
from attnsieve.methods import LayerContext, make
from attnsieve.methods.flexprefill import coverage_count, sqrt_js_divergence

from helpers import assert_close, masked_dense_reference


def plan_mask(plan, H, Tq, Tk, bs):
    """[B, H, Tq, Tk] bool: the support's blocks plus the listed tokens, by loops (slow and obvious)."""
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    blocks = plan.support.to_mask(n_k)  # [B, Hs, NQ, NK]
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


def planted_heads(T=512, D=32, seed=0):
    """Head 0: block-constant keys, near-identical queries, one favoured block (the pooled estimate is faithful).
    Head 1: random keys with a few heavy key columns and a strong diagonal (pooling dilutes both)."""
    g = torch.Generator().manual_seed(seed)
    bs = 32
    u = torch.randn(D, generator=g)
    centers = torch.randn(T // bs, D, generator=g)
    centers[1] += u * 5 * D**0.5 / u.dot(u)  # one key block every query attends (scaled score +5)
    k0 = centers.repeat_interleave(bs, 0) + 0.05 * torch.randn(T, D, generator=g)
    q0 = u + 0.05 * torch.randn(T, D, generator=g)
    k1 = torch.randn(T, D, generator=g)
    q1 = torch.randn(T, D, generator=g)
    w = torch.randn(D, generator=g)
    w = w / w.norm() * 6
    for t in (40, 170, 300):
        k1[t] = w * 4
    q1 = q1 + w + 2 * k1  # every query likes the heavy columns and its own key
    q = torch.stack([q0, q1])[None]
    k = torch.stack([k0, k1])[None]
    return q, k, torch.randn(1, 2, T, D, generator=g)


def test_decision_picks_query_aware_and_vertical_slash_heads():
    q, k, _ = planted_heads()
    ctx = LayerContext(0, q.shape[-1] ** -0.5)
    plan = make("flexprefill", block_size=32, chunks=4).plan(q, k, ctx)
    est = plan.estimated[0]
    assert est.tolist() == [False, True, True, True]  # the first chunk has nothing before it
    assert plan.query_aware[0, 0, est].all(), "block-structured head should be query-aware"
    assert not plan.query_aware[0, 1, est].any(), "column/diagonal head should be vertical-slash"


def test_sqrt_js_divergence_matches_definition():
    p, q = torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.1, 0.6, 0.3])
    m = (p + q) / 2
    kl = lambda a, b: sum(float(x) * torch.log(x / y).item() for x, y in zip(a, b, strict=True) if x > 0)  # noqa: E731
    assert abs(float(sqrt_js_divergence(p, q)) - (0.5 * kl(p, m) + 0.5 * kl(q, m)) ** 0.5) < 1e-6
    assert float(sqrt_js_divergence(p, p)) == 0.0


@pytest.mark.parametrize("gamma", [0.3, 0.8, 0.95])
def test_coverage_count_is_the_fewest_entries_reaching_gamma(gamma):
    g = torch.Generator().manual_seed(1)
    mass = torch.rand(5, 40, generator=g) ** 4
    mass = mass / mass.sum(-1, keepdim=True)
    got = coverage_count(mass, torch.full((5,), gamma))
    for r in range(5):
        vals = sorted(mass[r].tolist(), reverse=True)
        total, n = 0.0, 0
        while total < gamma:  # naive: add the largest entries one by one
            total += vals[n]
            n += 1
        assert int(got[r]) == n


def naive_vertical(q, k, lo, s_c, scale):
    """Mean attention each key t < s_c receives from queries lo .. s_c - 1 (dense loops per row)."""
    H = q.shape[1]
    out = torch.zeros(H, s_c)
    for h in range(H):
        for p in range(lo, s_c):
            s = (k[0, h * k.shape[1] // H, : p + 1] @ q[0, h, p]) * scale
            out[h, : p + 1] += torch.softmax(s, -1)
    return out / (s_c - lo)


def test_vertical_selection_covers_gamma_and_query_aware_rows_cover_gamma():
    q, k, _ = planted_heads(seed=3)
    scale = q.shape[-1] ** -0.5
    ctx = LayerContext(0, scale)
    bs, gamma = 32, 0.7
    method = make("flexprefill", block_size=bs, chunks=4, gamma=gamma, min_budget=1)
    plan = method.plan(q, k, ctx)
    L = plan.chunk_blocks
    for c in (1, 2, 3):
        s_c = c * L * bs
        naive = naive_vertical(q, k, s_c - bs, s_c, scale)
        assert_close(plan.vertical[c][0], naive, atol=1e-5, rtol=1e-4)
        # Vertical-slash head: its listed tokens (before dropping covered ones) are the fewest keys covering gamma.
        chosen = [t for t in plan.tokens[0, 1, c * L].tolist() if t >= 0]
        got = naive[1, chosen].sum()
        assert got >= gamma - 1e-5
        assert got - naive[1, chosen].min() < gamma
        # Query-aware head: every query block keeps the blocks that cover gamma of its lagged pooled estimate.
        assert plan.query_aware[0, 0, c] and not plan.query_aware[0, 1, c]
        blocks = plan.support.to_mask(q.shape[2] // bs)[0, 0]
        for j in range(c * L, (c + 1) * L):
            qbar = q[0, 0, (j - 1) * bs : j * bs].mean(0)
            kbar = k[0, 0, : j * bs].view(j, bs, -1).mean(1)
            probs = torch.softmax(kbar @ qbar * scale, -1)
            order = probs.argsort(descending=True).tolist()
            need, total = [], 0.0
            while total < gamma:
                need.append(order[len(need)])
                total += float(probs[need[-1]])
            assert blocks[j, need].all(), (c, j, need)


@pytest.mark.parametrize("heads", [(4, 1), (2, 2)], ids=["GQA", "MHA"])
@pytest.mark.parametrize("density", [None, 0.3])
def test_executed_attention_equals_masked_dense_of_the_plan(heads, density):
    H, Hkv = heads
    T, bs = 300, 16
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, H, T, 16, generator=g)
    q = q[:, :, :1] + 0.5 * q
    k, v = torch.randn(2, Hkv, T, 16, generator=g), torch.randn(2, Hkv, T, 16, generator=g)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :45] = False
    ctx = LayerContext(0, 0.25, None, valid)
    method = make("flexprefill", block_size=bs, density=density)
    plan = method.plan(q, k, ctx)
    assert plan.tokens is not None and plan.estimated.any()
    res = method.prefill(q, k, v, ctx)
    mask = plan_mask(plan, H, T, T, bs) & valid[:, None, None, :]
    ref, _ = masked_dense_reference(q, k, v, mask, scale=0.25)
    rows = mask.any(-1) & valid[:, None, :]
    assert_close(res.out[rows], ref[rows])
    assert res.cells == int(mask[rows[..., None].expand_as(mask)].sum())


def test_chunked_prefill_call_with_fewer_queries_than_keys():
    """Tq < Tk: the queries sit at the end; the output equals masked dense of the plan."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 100, 16, generator=g)
    k, v = torch.randn(1, 1, 260, 16, generator=g), torch.randn(1, 1, 260, 16, generator=g)
    ctx = LayerContext(0, 0.25)
    method = make("flexprefill", block_size=16, density=0.3)
    plan = method.plan(q, k, ctx)
    res = method.prefill(q, k, v, ctx)
    mask = plan_mask(plan, 2, 100, 260, 16)
    ref, _ = masked_dense_reference(q, k, v, mask, scale=0.25)
    assert_close(res.out, ref)


def test_short_inputs_run_dense():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 4, 250, 32, generator=g), torch.randn(1, 1, 250, 32, generator=g),
               torch.randn(1, 1, 250, 32, generator=g))
    res = make("flexprefill").prefill(q, k, v, LayerContext(0, 32**-0.5))  # 250 <= 2 * block_size
    ref, _ = dense_attention(q, k, v)
    assert_close(res.out, ref)
    assert res.cells == 4 * exact_cells(250, 250)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_lands_near_target(density):
    g = torch.Generator().manual_seed(7)
    T, H = 2048, 4
    q = torch.randn(1, H, T, 64, generator=g)
    q = q[:, :, :1] + 0.5 * q  # neighbouring queries correlate, as in real models
    k, v = torch.randn(1, 1, T, 64, generator=g), torch.randn(1, 1, T, 64, generator=g)
    res = make("flexprefill", block_size=64, density=density).prefill(q, k, v, LayerContext(0, 0.125))
    measured = res.cells / (H * exact_cells(T, T))
    # floor: sink + diagonal blocks and the dense-or-local first chunk (about 0.08 here)
    assert 0.7 * density <= measured <= 1.3 * density + 0.02, measured


@pytest.mark.parametrize(
    "key,value", [("gamma", 0.0), ("gamma", 1.5), ("tau", -0.1), ("min_budget", 0), ("max_budget", 0),
                  ("density", 0.0), ("block_size", 8), ("last_q", 0), ("chunks", 0)],
)
def test_bad_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make("flexprefill", **{key: value})

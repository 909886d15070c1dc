"""FlexPrefill: the pattern decision, gamma coverage against naive loops, exactness of the executed plan, density."""

from __future__ import annotations

import math

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
    plan = make("flexprefill", block_size=32, chunks=4, causal=True, min_budget=4).plan(q, k, ctx)
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
    method = make("flexprefill", block_size=bs, chunks=4, gamma=gamma, min_budget=1, causal=True)
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


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
@pytest.mark.parametrize("heads", [(4, 1), (2, 2)], ids=["GQA", "MHA"])
@pytest.mark.parametrize("density", [None, 0.3])
def test_executed_attention_equals_masked_dense_of_the_plan(heads, density, causal):
    H, Hkv = heads
    T, bs = 300, 16
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, H, T, 16, generator=g)
    q = q[:, :, :1] + 0.5 * q
    k, v = torch.randn(2, Hkv, T, 16, generator=g), torch.randn(2, Hkv, T, 16, generator=g)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :45] = False
    ctx = LayerContext(0, 0.25, None, valid)
    method = make("flexprefill", block_size=bs, density=density, causal=causal, min_budget=64)
    plan = method.plan(q, k, ctx)
    assert plan.estimated.any() and (plan.tokens is not None) == causal
    res = method.prefill(q, k, v, ctx)
    mask = plan_mask(plan, H, T, T, bs) & valid[:, None, None, :]
    ref, _ = masked_dense_reference(q, k, v, mask, scale=0.25)
    rows = mask.any(-1) & valid[:, None, :]
    assert_close(res.out[rows], ref[rows])
    assert res.cells == int(mask[rows[..., None].expand_as(mask)].sum())


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
def test_chunked_prefill_call_with_fewer_queries_than_keys(causal):
    """Tq < Tk: the queries sit at the end; the output equals masked dense of the plan."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 100, 16, generator=g)
    k, v = torch.randn(1, 1, 260, 16, generator=g), torch.randn(1, 1, 260, 16, generator=g)
    ctx = LayerContext(0, 0.25)
    method = make("flexprefill", block_size=16, density=0.3, causal=causal)
    plan = method.plan(q, k, ctx)
    assert plan.estimated.any()
    res = method.prefill(q, k, v, ctx)
    mask = plan_mask(plan, 2, 100, 260, 16)
    ref, _ = masked_dense_reference(q, k, v, mask, scale=0.25)
    assert_close(res.out, ref)


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
@pytest.mark.parametrize("T", [250, 1024])
def test_short_inputs_run_dense(T, causal):
    """Up to max(2 * block_size, ceil(min_budget / block_size) * block_size) = 1024 tokens: dense, as the paper."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 4, T, 32, generator=g), torch.randn(1, 1, T, 32, generator=g),
               torch.randn(1, 1, T, 32, generator=g))
    res = make("flexprefill", causal=causal).prefill(q, k, v, LayerContext(0, 32**-0.5))
    ref, _ = dense_attention(q, k, v)
    assert_close(res.out, ref)
    assert res.cells == 4 * exact_cells(T, T)
    res = make("flexprefill", causal=causal).prefill(*(x.repeat_interleave(2, 2) for x in (q, k, v)),
                                                     LayerContext(0, 32**-0.5))
    assert res.cells < 4 * exact_cells(2 * T, 2 * T) or T == 250  # 2048 tokens: sparse


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_lands_near_target(density, causal):
    g = torch.Generator().manual_seed(7)
    T, H = 2048, 4
    q = torch.randn(1, H, T, 64, generator=g)
    q = q[:, :, :1] + 0.5 * q  # neighbouring queries correlate, as in real models
    k, v = torch.randn(1, 1, T, 64, generator=g), torch.randn(1, 1, T, 64, generator=g)
    res = make("flexprefill", block_size=64, density=density, causal=causal).prefill(q, k, v, LayerContext(0, 0.125))
    measured = res.cells / (H * exact_cells(T, T))
    # floor: sink + diagonal blocks and the dense-or-local first chunk (about 0.08 here)
    assert 0.7 * density <= measured <= 1.3 * density + 0.02, measured


@pytest.mark.parametrize(
    "key,value", [("gamma", 0.0), ("gamma", 1.5), ("tau", -0.1), ("min_budget", 0), ("max_budget", 0),
                  ("density", 0.0), ("block_size", 8), ("last_q", 0), ("chunks", 0), ("ref_context", 0)],
)
def test_bad_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make("flexprefill", **{key: value})


# --- The paper's (look-ahead) estimate against a loop re-implementation of the reference code ---


def naive_flexprefill(q, k, gamma, tau, min_budget, bs):
    """FlexPrefill's active blocks, head by head with loops: {h: set of (query block, key block)}.

    Follows bytedance/FlexPrefill, flex_prefill/ops/flex_prefill_attention.py, `get_active_blocks` as
    `flex_prefill_attention` calls it (budgets in blocks, ceil(min_budget / bs)), Tq == Tk, no padding:
    1. the last bs queries against all keys, scaled, causal on the bs x bs tail, softmax per row;
    2. vertical[t] = mean over those rows; slash[o] = sum over rows (position p) of prob[p, p - o] / rows;
    3. each budget = (tokens whose sorted cumulative mass stays <= gamma) + 1, then // bs + 1 blocks,
       at least ceil(min_budget / bs), at most the number of blocks;
    4. vertical mass summed per key block; slash mass summed over reversed offsets (index T - 1 - o) in
       blocks of bs from index 0, block b being block diagonal s = blocks - 1 - b;
    5. query-aware head when sqrt(JS(softmax(mean last query . mean keys per block), vertical block
       mass)) < tau; its budgets drop to ceil(min_budget / bs);
    6. key block 0 and block diagonal 0 forced; top vertical key blocks (kept for query blocks at or
       after them) and top block diagonals s (query block i, key block i - s);
    7. query-aware heads add: each query block's mean query . mean keys, softmax over key blocks <= i
       (diagonal included), all rows flattened, taken largest first while the cumulative sum <= gamma x blocks.
    """
    _, H, T, D = q.shape
    G = H // k.shape[1]
    scale = D**-0.5
    n = math.ceil(T / bs)
    min_b = math.ceil(min_budget / bs)
    out = {}
    for h in range(H):
        kh = k[0, h // G]
        rows = list(range(T - bs, T))
        vert, slash = [0.0] * T, [0.0] * T
        for p in rows:
            prob = torch.softmax(torch.stack([q[0, h, p] @ kh[t] * scale for t in range(p + 1)]), 0)
            for t in range(p + 1):
                vert[t] += float(prob[t]) / len(rows)
                slash[p - t] += float(prob[t]) / len(rows)

        def budget(mass):
            total, count = 0.0, 0
            for x in sorted(mass, reverse=True):
                if total + x > gamma:
                    break
                total += x
                count += 1
            return min(max((count + 1) // bs + 1, min_b), n)

        nv, ns = budget(vert), budget(slash)
        v_blk = [sum(vert[b * bs : (b + 1) * bs]) for b in range(n)]
        rev = [slash[T - 1 - j] for j in range(T)]  # index j holds offset T - 1 - j
        s_blk = {n - 1 - b: sum(rev[b * bs : (b + 1) * bs]) for b in range(n)}  # block diagonal s
        kbar = [kh[b * bs : (b + 1) * bs].mean(0) for b in range(n)]
        qlast = q[0, h, T - bs :].mean(0)
        est = torch.softmax(torch.stack([qlast @ kb * scale for kb in kbar]), 0).tolist()
        m = [(a + b) / 2 for a, b in zip(est, v_blk, strict=True)]
        js = sum(0.5 * a * math.log(a / c) for a, c in zip(est, m, strict=True) if a > 0)
        js += sum(0.5 * b * math.log(b / c) for b, c in zip(v_blk, m, strict=True) if b > 0)
        aware = math.sqrt(max(js, 0.0)) < tau
        if aware:
            nv = ns = min_b
        v_score = [math.inf] + v_blk[1:]
        s_score = {s: (math.inf if s == 0 else x) for s, x in s_blk.items()}
        top_v = sorted(range(n), key=lambda b: -v_score[b])[:nv]
        top_s = sorted(s_score, key=lambda s: -s_score[s])[:ns]
        chosen = {(i, v) for i in range(n) for v in top_v if v <= i}
        chosen |= {(i, i - s) for i in range(n) for s in top_s if i - s >= 0}
        if aware:
            cells = []
            for i in range(n):
                qbar = q[0, h, i * bs : (i + 1) * bs].mean(0)
                probs = torch.softmax(torch.stack([qbar @ kbar[b] * scale for b in range(i + 1)]), 0)
                cells += [(float(x), i, b) for b, x in enumerate(probs)]
            total = 0.0
            for x, i, b in sorted(cells, reverse=True):
                total += x
                if total > gamma * n:
                    break
                chosen.add((i, b))
        out[h] = (chosen, aware)
    return out


def blocks_of(plan, h, n):
    mask = plan.support.to_mask(n)[0, h]
    return {tuple(ij) for ij in torch.nonzero(mask).tolist()}


@pytest.mark.parametrize("seed", [0, 3])
def test_paper_selection_equals_reference_loop(seed):
    q, k, _ = planted_heads(T=512, seed=seed)  # head 0 query-aware, head 1 vertical-slash
    g = torch.Generator().manual_seed(seed)
    q, k = q[:, :, :480], k[:, :, :480]  # 15 blocks of 32
    q = torch.cat([q, q[:, :1] + torch.randn(1, 1, 480, 32, generator=g)], 1)  # head 2: random
    k = torch.cat([k, k[:, :1]], 1)  # (three KV heads: MHA)
    method = make("flexprefill", block_size=32, min_budget=64, gamma=0.8)
    assert method.params.causal is False
    plan = method.plan(q, k, LayerContext(0, 32**-0.5))
    want = naive_flexprefill(q, k, 0.8, 0.1, 64, 32)
    for h, (blocks, aware) in want.items():
        assert bool(plan.query_aware[0, h, 0]) == aware, h
        assert blocks_of(plan, h, 15) == blocks, (h, sorted(blocks_of(plan, h, 15) ^ blocks))
    assert want[0][1] and not want[1][1], "the planted heads must exercise both branches"


def test_paper_selection_of_planted_heads_written_by_hand():
    """Head 1 puts its mass on key columns 40, 170 and 300; head 0 on key block 1.

    Three tokens cover gamma, which the reference turns into 3 // 32 + 1 = 1 block, the forced block 0
    itself; min_budget = 128 tokens (4 blocks) lets the three heavy blocks in beside it.
    """
    q, k, _ = planted_heads(T=512)
    plan = make("flexprefill", block_size=32, min_budget=128, gamma=0.9).plan(q, k, LayerContext(0, 32**-0.5))
    assert plan.query_aware[0, :, 0].tolist() == [True, False]
    head0, head1 = blocks_of(plan, 0, 16), blocks_of(plan, 1, 16)
    # head 1 (vertical-slash): the heavy columns' key blocks 1, 5 and 9 for every query block at or after
    # them, key block 0 (forced) and the diagonal block everywhere
    for i in range(16):
        assert {(i, 0), (i, i)} <= head1, i
        assert {(i, b) for b in (1, 5, 9) if b <= i} <= head1, i
    # head 0 (query-aware): every query block from 1 on keeps the favoured key block 1
    assert {(i, 1) for i in range(1, 16)} <= head0

"""longheads: chunk summaries, the per-query selection (the paper's) and the per-block one against naive loops,
planted chunks, masked dense, density."""

from __future__ import annotations

import math

import pytest
import torch

from attnsieve.kernels import exact_cells
from attnsieve.methods import LayerContext, make
from attnsieve.methods.longheads import chunk_keys

from block_routing_helpers import ctx_for, qkv, token_mask_from_blocks
from helpers import assert_close, masked_dense_reference


def naive_chunk_key(q, k, v, valid, b, h, c, cs, scale):
    """The reference implementation's chunk key for one head and chunk, as plain loops."""
    Hkv, H = k.shape[1], q.shape[1]
    g = h * Hkv // H
    pos = [t for t in range(c * cs, min((c + 1) * cs, k.shape[2])) if valid[b, t]]
    keys = k[b, g, pos].double()
    outs = []
    for t in pos:
        w = torch.softmax(q[b, h, t].double() @ keys.T * scale, 0)
        outs.append(w @ v[b, g, pos].double())
    probe = torch.stack(outs).mean(0)
    w = torch.softmax(probe @ keys.T * scale, 0)
    return w @ keys


def test_chunk_keys_equal_naive_loop():
    q, k, v = qkv(B=2, H=4, Hkv=2, T=100, seed=1)
    valid = torch.ones(2, 100, dtype=torch.bool)
    valid[1, :30] = False
    got = chunk_keys(q, k, v, valid, 32, 0.25, "attn")  # [B, H, NC, D]
    for b in range(2):
        for h in range(4):
            for c in range(4):
                if b == 1 and c == 0:
                    continue  # pure padding chunk: never a candidate
                assert_close(got[b, h, c].double(), naive_chunk_key(q, k, v, valid, b, h, c, 32, 0.25), atol=1e-5)


def row_blocks(support, n_k):
    """[B, Hs, NQ, R, n_k] bool: the key blocks each query row of a support attends (its own slots)."""
    b = support.blocks
    cols = torch.where(b >= 0, b, n_k)
    if support.row_mask is None:
        own = (b >= 0)[:, :, :, None, :].expand(-1, -1, -1, support.block_size, -1)
    else:
        own = support.row_mask & (b >= 0)[:, :, :, None, :]
    out = torch.zeros(*own.shape[:4], n_k + 1, dtype=torch.bool)
    out.scatter_(4, cols[:, :, :, None, :].expand_as(own), own)  # a row's slots are distinct; n_k: unused
    return out[..., :n_k]


def naive_longheads_per_query(q, k, v, valid, bs, cs, n_chunks, scale):
    """The reference's prefill chunk selection, token by token: [B, H, T, NK] key blocks per query.

    Follows LuLuLuyi/LongHeads, modeling_longheads/modeling_llama.py, `LlamaAttention.forward` (the
    `ori_len > 1` branch, with begin_selective_length = atten_length = n_chunks * cs):
    1. every chunk of `cs` keys is summarised by a chunk key (checked against loops in
       test_chunk_keys_equal_naive_loop);
    2. a query whose causal context fits in n_chunks chunks attends all of it (the reference encodes
       the first atten_length tokens densely);
    3. otherwise the query's OWN vector scores every chunk up to its own (`global_qk`, per token);
       chunk 0, the query's chunk and the one before it are forced (`select_value`); the query keeps
       its top n_chunks (`topk(atten_chunk_num)`), the forced ones among them;
    4. it attends the blocks of those chunks up to its own block (the kernel masks causally inside).
    """
    B, H, T, _ = q.shape
    n = math.ceil(T / bs)
    keys = chunk_keys(q, k, v, valid, cs, scale, "attn")
    mask = torch.zeros(B, H, T, n, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                if not valid[b, t]:
                    continue
                cur = t // cs
                real = [c for c in range(cur + 1) if valid[b, c * cs : (c + 1) * cs].any()]
                forced = [c for c in real if c in (0, cur, cur - 1)]
                others = sorted((c for c in real if c not in forced), key=lambda c: -float(q[b, h, t] @ keys[b, h, c]))
                for c in forced + others[: max(0, n_chunks - len(forced))]:
                    for i in range(c * cs // bs, min((c + 1) * cs // bs, t // bs + 1)):
                        mask[b, h, t, i] = bool(valid[b, i * bs : (i + 1) * bs].any())
    return mask


@pytest.mark.parametrize("T", [400, 512])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_per_query_selection_equals_reference_loop(T, padded):
    q, k, v = qkv(B=2, H=4, Hkv=2, T=T, D=16, seed=7)
    valid = torch.ones(2, T, dtype=torch.bool)
    if padded:
        valid[1, :70] = False
    m = make("longheads", block_size=16, chunk_size=32, max_len=160)  # 5 chunks of 32 per query
    assert m.params.per_query
    ctx = ctx_for(q, valid if padded else None)
    sup = m.support(q, k, ctx, v)
    n = math.ceil(T / 16)
    got = row_blocks(sup, n).flatten(2, 3)[:, :, :T]  # [B, H, T, NK]: grid row = token
    ref = naive_longheads_per_query(q, k, v, valid, 16, 32, 5, ctx.scale)
    assert torch.equal(got[valid[:, None].expand(-1, 4, -1)], ref[valid[:, None].expand(-1, 4, -1)])
    # a block computes the union of its queries' chunks (up to 10 blocks a query, more a block)
    union = torch.nn.functional.pad(ref, (0, 0, 0, n * 16 - T)).view(2, 4, n, 16, n).any(3)
    assert torch.equal(sup.to_mask(n), union)
    assert bool((got.sum(-1) <= 10).all()) and bool((union.sum(-1) > 10).any())


def test_per_query_selection_of_a_planted_pattern():
    """Written out by hand: query 505 (chunk 15, block 31) alone aligns with the keys of chunk 3, so it
    attends chunks 0, 3, 14, 15 = key blocks {0, 1, 6, 7, 28, 29, 30, 31}; its block computes them
    (with its other queries' chunks). No other query's blocks move when 505 asks, and the per-block
    selection of block 31 (from block 30's queries) cannot see the question at all."""
    T, D, bs, cs = 512, 32, 16, 32
    q, k, v = qkv(H=1, Hkv=1, T=T, D=D, seed=12)
    u = torch.nn.functional.normalize(torch.ones(D), dim=0) * D**0.5
    q, k = 0.3 * q, 0.3 * k
    q = q - (q @ u)[..., None] * u / D  # no query or key has a component along u ...
    k = k - (k @ u)[..., None] * u / D
    k[:, :, 96:128] += 2 * u  # ... but the keys of chunk 3
    asked = q.clone()
    asked[:, :, 505] += 3 * u  # ... and query 505
    params = dict(block_size=bs, chunk_size=cs, max_len=4 * cs)  # first, previous, current + one chosen
    method = make("longheads", **params)
    sup = method.support(asked, k, ctx_for(q), v)
    rows = row_blocks(sup, T // bs)[0, 0].flatten(0, 1)  # [T, NK]: grid row = token
    assert set(torch.nonzero(rows[505]).flatten().tolist()) == {0, 1, 6, 7, 28, 29, 30, 31}
    assert {6, 7} <= set(torch.nonzero(sup.to_mask(T // bs)[0, 0, 31]).flatten().tolist())
    before = row_blocks(method.support(q, k, ctx_for(q), v), T // bs)[0, 0].flatten(0, 1)
    others = torch.arange(T) != 505
    assert torch.equal(rows[others], before[others])
    assert not bool(before[505, 6:8].any())  # without the question, query 505 takes another chunk
    per_block = make("longheads", per_query=False, **params)
    assert torch.equal(per_block.support(asked, k, ctx_for(q), v).to_mask(T // bs)[0, 0, 31],
                       per_block.support(q, k, ctx_for(q), v).to_mask(T // bs)[0, 0, 31])


def naive_lagged_selection(q, k, v, valid, bs, cs, n_chunks, scale):
    """per_query=False, [B, H, NQ, NK] block mask: forced first / previous / current chunk plus the chunks
    that score best against the previous block's mean query."""
    B, H, T, _ = q.shape
    n, cpb = math.ceil(T / bs), cs // bs
    n_c = math.ceil(T / cs)
    keys = chunk_keys(q, k, v, valid, cs, scale, "attn")  # checked against loops above
    mask = torch.zeros(B, H, n, n, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for j in range(n):
                if not valid[b, j * bs : (j + 1) * bs].any():
                    continue
                if j > 0 and valid[b, (j - 1) * bs : j * bs].any():
                    qr = q[b, h, (j - 1) * bs : j * bs][valid[b, (j - 1) * bs : j * bs]].float().mean(0)
                else:
                    qr = q[b, h, j * bs + int(torch.nonzero(valid[b, j * bs : (j + 1) * bs])[0])].float()
                cur = j // cpb
                real = [c for c in range(min(cur, n_c - 1) + 1) if valid[b, c * cs : (c + 1) * cs].any()]
                forced = [c for c in real if c in (0, cur, cur - 1)]
                others = sorted((c for c in real if c not in forced), key=lambda c: -float(qr @ keys[b, h, c]))
                for c in forced + others[: max(0, n_chunks - len(forced))]:
                    for i in range(c * cpb, min((c + 1) * cpb, j + 1)):
                        mask[b, h, j, i] = bool(valid[b, i * bs : (i + 1) * bs].any())
    return mask


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_per_block_selection_equals_naive_loop(padded):
    q, k, v = qkv(B=2, H=4, Hkv=1, T=400, seed=2)
    valid = torch.ones(2, 400, dtype=torch.bool)
    if padded:
        valid[0, :70] = False
    m = make("longheads", block_size=16, chunk_size=32, max_len=160, per_query=False)  # 5 chunks per block
    ctx = ctx_for(q, valid if padded else None)
    got = m.support(q, k, ctx, v).to_mask(25)
    ref = naive_lagged_selection(q, k, v, valid, 16, 32, 5, ctx.scale)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("per_query", [True, False])
def test_attended_length_stays_within_max_len(per_query):
    q, k, v = qkv(T=1000, seed=3)
    m = make("longheads", block_size=16, chunk_size=64, max_len=256, per_query=per_query)
    rows = row_blocks(m.support(q, k, ctx_for(q), v), 63).flatten(2, 3)[:, :, :1000]  # [B, H, T, NK]
    assert int(rows.sum(-1).max()) * 16 <= 256
    assert bool(rows[..., 0].all())  # the first chunk is always kept
    dense = make("longheads", block_size=16, chunk_size=64, max_len=1024).support(q, k, ctx_for(q), v).to_mask(63)
    assert torch.equal(dense[0, 0], torch.ones(63, 63, dtype=torch.bool).tril())  # within max_len: dense


@pytest.mark.parametrize("per_query", [True, False])
def test_planted_chunk_is_selected(per_query):
    q, k, v = qkv(T=2048, D=32, seed=4)
    u = torch.randn(32)
    q[:, :, 1500:] += 3 * u
    k[:, :, 512:768] += 3 * u  # chunk 2 of 256
    m = make("longheads", max_len=1024, per_query=per_query)  # 4 chunks: first, previous, current, one chosen
    rows = row_blocks(m.support(q, k, ctx_for(q), v), 32).flatten(2, 3)[0]  # [H, T, NK]
    assert bool(rows[:, 1600:, 8:12].all())  # queries past 1600 chose chunk 2 (blocks 8..11)
    if per_query:
        assert bool(rows[:, 1500:, 8:12].all())  # from the first query that carries u


@pytest.mark.parametrize("per_query", [True, False])
@pytest.mark.parametrize("density", [None, 0.3])
@pytest.mark.parametrize("window", [None, 90])
def test_execution_equals_masked_dense(window, density, per_query):
    q, k, v = qkv(B=2, T=300, seed=5)
    valid = torch.ones(2, 300, dtype=torch.bool)
    valid[1, :45] = False
    m = make("longheads", block_size=16, chunk_size=32, max_len=128, density=density, per_query=per_query)
    ctx = ctx_for(q, valid, window)
    res = m.prefill(q, k, v, ctx)
    sup = m.support(q, k, ctx, v)
    causal = torch.ones(300, 300, dtype=torch.bool).tril() & valid[:, None, None, :]
    own = row_blocks(sup, 19).flatten(2, 3)[:, :, :300]  # [B, H, T, NK]: each query's own blocks
    mask = own.repeat_interleave(16, -1)[..., :300] & causal
    computed = token_mask_from_blocks(sup.to_mask(19), 4, 300, 16, valid)  # the blocks' unions
    if window is not None:
        pos = torch.arange(300)
        mask &= pos[:, None] - pos[None, :] < window
        computed &= pos[:, None] - pos[None, :] < window
    ref, _ = masked_dense_reference(q, k, v, mask)
    rows = mask.any(-1)
    assert_close(res.out[rows], ref[rows])
    assert res.cells == int(computed[valid[:, None, :, None].expand_as(computed)].sum())


@pytest.mark.parametrize("per_query", [True, False])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_lands_near_target(density, per_query):
    q, k, v = qkv(T=4096, D=32, seed=6)
    res = make("longheads", density=density, per_query=per_query).prefill(q, k, v, LayerContext(0, 32**-0.5))
    measured = res.cells / (4 * exact_cells(4096, 4096))
    assert 0.8 * density <= measured <= 1.2 * density + 0.01, measured


@pytest.mark.parametrize("key,value", [("chunk_size", 100), ("max_len", 256), ("density", 2.0), ("chunk_repr", "max")])
def test_bad_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make("longheads", **{key: value})


@pytest.mark.parametrize("density", [None, 0.3])
def test_per_query_selection_has_no_causal_leak(density):
    """The paper's rule reads a query's own vector and the summaries of chunks before its previous one:
    changing queries, keys and values from t on never changes an output before t (small chunks, so the
    selection is not dense here as it is in the generic test's defaults)."""
    q, k, v = qkv(T=400, D=16, seed=8)
    m = make("longheads", block_size=16, chunk_size=32, max_len=128, density=density)
    base = m.prefill(q, k, v, ctx_for(q)).out
    for t in (40, 150, 333):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, t:], k2[:, :, t:] = 3 * q2[:, :, t:].flip(2), 3 * k2[:, :, t:].flip(2)
        v2[:, :, t:] = v2[:, :, t:].flip(2)
        assert_close(m.prefill(q2, k2, v2, ctx_for(q)).out[:, :, :t], base[:, :, :t])

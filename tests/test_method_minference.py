"""MInference's vertical-slash and block-sparse patterns against slow references and planted structure."""

from __future__ import annotations

import math

import pytest
import torch

from attnsieve.kernels import dense_attention, exact_cells
from attnsieve.methods import LayerContext, make
from attnsieve.methods.vertical_slash import FORCED, last_q_scores

from helpers import assert_close, masked_dense_reference


def qkv(B=1, H=4, Hkv=1, T=300, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g),
            torch.randn(B, Hkv, T, D, generator=g))


def ctx_of(q, window=None, key_valid=None):
    return LayerContext(0, q.shape[-1] ** -0.5, window, key_valid)


def support_to_token_mask(support, tokens, H, T, bs):
    """[B, H, T, T] bool: every cell the support and the token lists put in scope (before causality)."""
    B, Hs, NQ, _ = support.blocks.shape
    n_k = math.ceil(T / bs)
    blk = support.to_mask(n_k).repeat_interleave(H // Hs, dim=1)  # [B, H, NQ, NK]
    mask = blk.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :T, :T].clone()
    for b, h, j, m in (tokens >= 0).nonzero().tolist():
        for g in range(H // Hs):
            mask[b, h * (H // Hs) + g, j * bs : (j + 1) * bs, int(tokens[b, h, j, m])] = True
    return mask


def naive_vertical_slash(q, k, method):
    """Loop-by-loop leak-free (causal=True) selection per chunk: ({(h, j): key blocks}, {(h, j): column tokens})."""
    p = method.params
    _, H, T, _ = q.shape
    G = H // k.shape[1]
    bs, C = p.block_size, method.chunk_tokens(T)
    nv0, ns0 = method.sizes(T)
    n_k = math.ceil(T / bs)
    scale = q.shape[-1] ** -0.5
    blocks, cols = {}, {}
    for h in range(H):
        for j in range(n_k):
            start = (j * bs) // C * C
            if start == 0:  # static chunk: sinks and the nearest diagonals
                L = min(T, start + C)
                vert = {t: FORCED - t for t in range(min(p.sink_columns, L))}
                slash = {o: (FORCED - o if o < p.local_diagonals else -o) for o in range(L)}
            else:
                L = start
                vert, slash = dict.fromkeys(range(L), 0.0), dict.fromkeys(range(L), 0.0)
                for pos in range(max(0, start - p.last_q), start):
                    s = torch.stack([q[0, h, pos] @ k[0, h // G, t] * scale for t in range(pos + 1)])
                    prob = torch.softmax(s, 0)
                    for t in range(pos + 1):
                        vert[t] += float(prob[t])
                        slash[pos - t] += float(prob[t])
                for t in range(min(p.sink_columns, L)):
                    vert[t] = FORCED - t
                for o in range(min(p.local_diagonals, L)):
                    slash[o] = FORCED - o
            top_v = sorted(vert, key=lambda t: -vert[t])[: min(nv0, L)]
            top_s = sorted(slash, key=lambda o: -slash[o])[: min(ns0, L)]
            covered = set()
            for o in top_s:  # MInference's key range of a diagonal for this query block, covered by blocks
                for pos in range(j * bs, (j + 1) * bs):
                    if pos - o >= 0:
                        covered.add((pos - o) // bs)
            blocks[h, j] = covered
            # columns after the query block are never attended, so they are not listed
            cols[h, j] = {t for t in top_v if t // bs not in covered and t < (j + 1) * bs}
    return blocks, cols


def test_vertical_slash_selection_equals_naive_loop():
    q, k, _ = qkv(H=2, Hkv=1, T=300, D=16, seed=1)
    # ref_context = T: the sizes are used as given (above MInference's floors of 30 / 50)
    method = make("vertical-slash", vertical_size=40, slash_size=60, ref_context=300, block_size=16, last_q=24,
                  causal=True)
    support, tokens = method.plan(q, k, ctx_of(q))
    blocks, cols = naive_vertical_slash(q, k, method)
    mask = support.to_mask(math.ceil(300 / 16))
    for (h, j), want in blocks.items():
        got = set(torch.nonzero(mask[0, h, j]).flatten().tolist())
        assert got == want, (h, j, sorted(got ^ want))
        got_cols = {t for t in tokens[0, h, j].tolist() if t >= 0}
        assert got_cols == cols[h, j], (h, j, sorted(got_cols ^ cols[h, j]))


def test_last_q_scores_equal_explicit_softmax_sums():
    q, k, _ = qkv(H=4, Hkv=2, T=200, D=16, seed=2)
    vert, slash = last_q_scores(q, k, 150, 30, 0.25, None, None)
    s = torch.einsum("bhld,bhtd->bhlt", q[:, :, 120:150], k[:, :, :150].repeat_interleave(2, 1)) * 0.25
    pos = torch.arange(120, 150)[:, None]
    s = s.masked_fill(torch.arange(150)[None, :] > pos, float("-inf"))
    prob = torch.softmax(s, -1)
    assert_close(vert, prob.sum(2), atol=1e-5, rtol=1e-5)
    want = torch.stack([sum(prob[..., r, 120 + r - o] for r in range(30) if 120 + r - o >= 0) for o in range(150)], -1)
    assert_close(slash, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
@pytest.mark.parametrize("density", [None, 0.15])
@pytest.mark.parametrize("heads", [(4, 1), (2, 2)], ids=["GQA", "MHA"])
@pytest.mark.parametrize("padded,window", [(False, None), (True, None), (False, 70)], ids=["plain", "padded", "win70"])
def test_vertical_slash_equals_masked_dense_over_its_support(density, heads, padded, window, causal):
    H, Hkv = heads
    T, bs = 250, 16
    q, k, v = qkv(B=2, H=H, Hkv=Hkv, T=T, seed=3)
    valid = torch.ones(2, T, dtype=torch.bool)
    if padded:
        valid[1, :41] = False
    method = make("vertical-slash", density=density, block_size=bs, vertical_size=5000, ref_context=T * 20,
                  slash_size=6096 if causal else 200, causal=causal)
    ctx = ctx_of(q, window, valid if padded else None)
    support, tokens = method.plan(q, k, ctx)
    assert (tokens >= 0).any(), "the test must exercise the token-gather part"
    res = method.prefill(q, k, v, ctx)
    pos = torch.arange(T)
    allowed = support_to_token_mask(support, tokens, H, T, bs) & (pos[None, :] <= pos[:, None])
    if window is not None:
        allowed &= pos[:, None] - pos[None, :] < window
    allowed &= valid[:, None, None, :] & valid[:, None, :, None]
    ref, _ = masked_dense_reference(q, k, v, allowed, scale=q.shape[-1] ** -0.5)
    rows = allowed.any(-1)
    assert_close(res.out[rows], ref[rows], atol=1e-5, rtol=1e-5)
    assert res.cells == int(allowed.sum())


def test_vertical_slash_keeps_a_planted_heavy_column():
    T, bs, col = 1024, 32, 600
    q, k, v = qkv(H=2, Hkv=2, T=T, D=32, seed=4)
    q = q[:, :, :1] + 0.3 * q  # neighbouring queries are correlated, as in real models
    k[:, :, col] = q[:, :, -1] * 3  # one key every query attends strongly
    # sizes as given (ref_context = T): a few columns beyond the 30 forced sinks
    method = make("vertical-slash", vertical_size=40, slash_size=64, block_size=bs, causal=True)
    support, tokens = method.plan(q, k, ctx_of(q))
    mask = support.to_mask(T // bs)
    C = method.chunk_tokens(T)
    late = [j for j in range(T // bs) if (j * bs) // C * C > col]  # chunks estimated after the column
    assert late
    for j in late:
        for h in range(2):
            assert mask[0, h, j, col // bs] or col in tokens[0, h, j].tolist(), (h, j)
    res = method.prefill(q, k, v, ctx_of(q))
    ref, _ = dense_attention(q, k, v)
    err = (res.out[:, :, -1] - ref[:, :, -1]).norm() / ref[:, :, -1].norm()
    assert err < 0.05, float(err)


def test_vertical_slash_keeps_a_planted_heavy_diagonal():
    T, bs, off = 1024, 16, 200
    q, k, v = qkv(H=2, Hkv=2, T=T, D=32, seed=5)
    k[:, :, : T - off] = 4 * q[:, :, off:]  # query p attends key p - off strongly
    # few forced diagonals, so the planted one has to win its place within the density budget
    method = make("vertical-slash", density=0.15, block_size=bs, local_diagonals=16, causal=True)
    support, _ = method.plan(q, k, ctx_of(q))
    mask = support.to_mask(T // bs)
    C = method.chunk_tokens(T)
    d_lo, d_hi = off // bs, -(-off // bs)
    for j in range(T // bs):
        if (j * bs) // C * C > off + method.params.last_q:
            assert mask[0, :, j, j - d_lo].all() and mask[0, :, j, j - d_hi].all(), j
    res = method.prefill(q, k, v, ctx_of(q))
    ref, _ = dense_attention(q, k, v)
    err = (res.out[:, :, -64:] - ref[:, :, -64:]).norm() / ref[:, :, -64:].norm()
    assert err < 0.1, float(err)  # the rest of the mass is spread over random keys


def test_vertical_slash_sizes_are_the_reference_ones_unscaled_unless_asked():
    assert make("vertical-slash").sizes(4096) == (1000, 6096)  # capped at the context when used
    assert make("vertical-slash", vertical_size=10, slash_size=20).sizes(4096) == (30, 50)  # MInference's floors
    m = make("vertical-slash", ref_context=131072)  # the opt-in length scaling
    assert m.sizes(131072) == (1000, 6096)
    assert m.sizes(4096) == (31, 190)
    assert m.sizes(1024) == (30, 50)
    assert m.chunk_tokens(4096) == 512 and m.chunk_tokens(300) == 256  # T / 8 in blocks, at least 4 blocks


def naive_block_sparse(q, k, keep_of, bs):
    """Loop-by-loop lagged (causal=True) selection: {(h, j): key blocks} (no padding, Tq == Tk)."""
    _, H, T, _ = q.shape
    G = H // k.shape[1]
    n = math.ceil(T / bs)
    out = {}
    for h in range(H):
        kp = [k[0, h // G, b * bs : (b + 1) * bs].mean(0) for b in range(n)]
        for j in range(n):
            chosen = {0, j}
            if j >= 1:
                qp = q[0, h, (j - 1) * bs : j * bs].mean(0)
                ranked = sorted(range(j), key=lambda b: -float(qp @ kp[b]))
                for b in ranked:
                    if len(chosen) >= keep_of(j):
                        break
                    chosen.add(b)
            out[h, j] = chosen
    return out


def test_block_sparse_selection_equals_naive_loop():
    q, k, _ = qkv(H=4, Hkv=2, T=500, D=16, seed=6)
    method = make("block-sparse", top_k=5, block_size=32, causal=True)
    support = method.support(q, k, ctx_of(q))
    mask = support.to_mask(16)
    want = naive_block_sparse(q, k, lambda j: min(5, j + 1), 32)
    for (h, j), blocks in want.items():
        assert set(torch.nonzero(mask[0, h, j]).flatten().tolist()) == blocks, (h, j)


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
def test_block_sparse_picks_the_planted_block(causal):
    T, bs = 1024, 16
    q, k, v = qkv(T=T, D=64, seed=7)
    q = q[:, :, :1] + 0.3 * q
    k[:, :, 304:320] = q[:, :, -1:].mean(1, keepdim=True) * 10
    method = make("block-sparse", density=0.1, block_size=bs, causal=causal)
    mask = method.support(q, k, ctx_of(q)).to_mask(T // bs)
    assert mask[0, :, 304 // bs + 2 :, 304 // bs].all()
    res = method.prefill(q, k, v, ctx_of(q))
    ref, _ = dense_attention(q, k, v)
    err = (res.out[:, :, -1] - ref[:, :, -1]).norm() / ref[:, :, -1].norm()
    assert err < 0.05, float(err)


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
@pytest.mark.parametrize("name", ["vertical-slash", "block-sparse"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_measured_density_lands_near_target(name, density, causal):
    T = 2048
    q, k, v = qkv(T=T, D=64, seed=8)
    q = q[:, :, :1] + 0.5 * q  # structured: correlated queries, keys sharing a common direction
    k = k + 0.5 * k[:, :, :1]
    res = make(name, density=density, causal=causal).prefill(q, k, v, ctx_of(q))
    measured = res.cells / (4 * exact_cells(T, T))
    # whole blocks of 64 (a row of ~16 blocks on average) and the sink/diagonal floor
    assert 0.7 * density <= measured <= 1.3 * density + 0.03, measured


@pytest.mark.parametrize(
    "name,key,value",
    [("vertical-slash", "slash_size", 0), ("vertical-slash", "last_q", 0), ("vertical-slash", "chunk", 100),
     ("vertical-slash", "local_diagonals", 0), ("vertical-slash", "density", 1.5), ("block-sparse", "top_k", 0),
     ("block-sparse", "block_size", 8), ("block-sparse", "local_blocks", -1), ("block-sparse", "ref_context", 0),
     ("vertical-slash", "ref_context", 0)],
)
def test_bad_parameters_raise_value_error_naming_the_value(name, key, value):
    with pytest.raises(ValueError, match=key):
        make(name, **{key: value})


def test_causal_block_sparse_needs_its_diagonal_block():
    make("block-sparse", local_blocks=0)  # the paper forces nothing
    with pytest.raises(ValueError, match="local_blocks"):
        make("block-sparse", local_blocks=0, causal=True)


# --- The paper's (look-ahead) estimators against loop re-implementations of the reference code ---


def naive_minference_vs(q, k, vertical_size, slash_size, last_q, sink, local):
    """MInference's vertical-and-slash estimate, one head at a time: {h: (columns, offsets)}.

    Follows microsoft/MInference, minference/modules/minference_forward.py, `vertical_and_slash_kernel`:
    1. sizes min(T, max(vertical_size, 30)) and min(T, max(slash_size, 50));
    2. per head, softmax(q k^T * scale) of the last `last_q` queries over all keys, causal on the tail;
    3. vertical score of key t: the sum of those rows' probabilities; the first `sink` columns forced (+inf);
    4. slash score of offset o: the sum over those rows (position p) of prob[p, p - o]; the `local`
       nearest offsets forced (+inf);
    5. the top vertical_size columns and top slash_size offsets form one pattern for every query
       (the kernel then lets query p see column t when t <= p, and key p - o for each offset o).
    """
    _, H, T, _ = q.shape
    G = H // k.shape[1]
    scale = q.shape[-1] ** -0.5
    nv, ns = min(T, max(vertical_size, 30)), min(T, max(slash_size, 50))
    out = {}
    for h in range(H):
        vert, slash = [0.0] * T, [0.0] * T
        for pos in range(T - last_q, T):
            prob = torch.softmax(torch.stack([q[0, h, pos] @ k[0, h // G, t] * scale for t in range(pos + 1)]), 0)
            for t in range(pos + 1):
                vert[t] += float(prob[t])
                slash[pos - t] += float(prob[t])
        for t in range(sink):
            vert[t] = math.inf
        for o in range(local):
            slash[o] = math.inf
        cols = set(sorted(range(T), key=lambda t: -vert[t])[:nv])
        offs = set(sorted(range(T), key=lambda o: -slash[o])[:ns])
        out[h] = (cols, offs)
    return out


def vs_pattern_as_blocks(cols, offs, j, bs, T):
    """The key blocks and leftover columns that cover a (columns, offsets) pattern for query block j."""
    covered = {(pos - o) // bs for pos in range(j * bs, min(T, (j + 1) * bs)) for o in offs if pos - o >= 0}
    return covered, {t for t in cols if t // bs not in covered and t < (j + 1) * bs}


@pytest.mark.parametrize("T,heads", [(300, (2, 1)), (257, (2, 2))], ids=["T300-GQA", "T257-MHA"])
def test_vertical_slash_paper_selection_equals_reference_loop(T, heads):
    q, k, _ = qkv(H=heads[0], Hkv=heads[1], T=T, D=16, seed=11)
    kw = dict(vertical_size=40, slash_size=60, last_q=24, sink_columns=4, local_diagonals=8)
    method = make("vertical-slash", block_size=16, **kw)
    assert method.params.causal is False  # the paper's estimate is the default
    support, tokens = method.plan(q, k, ctx_of(q))
    want = naive_minference_vs(q, k, 40, 60, 24, sink=4, local=8)
    mask = support.to_mask(math.ceil(T / 16))
    for h, (cols, offs) in want.items():
        for j in range(math.ceil(T / 16)):
            blocks, extra = vs_pattern_as_blocks(cols, offs, j, 16, T)
            assert set(torch.nonzero(mask[0, h, j]).flatten().tolist()) == blocks, (h, j)
            assert {t for t in tokens[0, h, j].tolist() if t >= 0} == extra, (h, j)


def planted_question(T=512, D=32, col=100, seed=12):
    """Random q/k/v where only the last 32 queries (the 'question') attend key `col` strongly."""
    q, k, v = qkv(H=1, Hkv=1, T=T, D=D, seed=seed)
    u = torch.nn.functional.normalize(torch.ones(D), dim=0)
    q, k = 0.3 * q, 0.3 * k
    q = q - (q @ u)[..., None] * u  # no query but the question's has a component along u
    k[:, :, col] = 4 * u * D**0.5
    q[:, :, -32:] += 3 * u
    return q, k, v


def test_vertical_slash_paper_finds_the_question_s_column_planted_by_hand():
    """Only the last 32 queries attend key 100; the paper's estimate lists it for every block after it."""
    T, bs = 512, 32
    q, k, v = planted_question(T)
    # 30 columns (the floor), no forced sinks, 50 diagonals of which only the main one is forced
    method = make("vertical-slash", vertical_size=30, slash_size=50, sink_columns=0, local_diagonals=1, block_size=bs)
    support, tokens = method.plan(q, k, ctx_of(q))
    mask = support.to_mask(T // bs)
    # written out: key 100 lies in key block 3; query blocks 3..15 must reach it (block or column)
    for j in range(3, 16):
        assert mask[0, 0, j, 3] or 100 in tokens[0, 0, j].tolist(), j
    # ... and the 50 nearest diagonals (offsets 0..49) cover key blocks j and j - 1 and j - 2 of block j
    for j in range(2, 16):
        assert mask[0, 0, j, j] and mask[0, 0, j, j - 1], j
    # the leak-free estimate cannot see the question: the last chunk (blocks 14, 15) misses key 100
    causal = make("vertical-slash", vertical_size=30, slash_size=50, sink_columns=0, local_diagonals=1,
                  block_size=bs, causal=True)
    c_support, c_tokens = causal.plan(q, k, ctx_of(q))
    c_mask = c_support.to_mask(T // bs)
    assert not any(c_mask[0, 0, j, 3] or 100 in c_tokens[0, 0, j].tolist() for j in (14, 15))


def naive_minference_block_sparse(q, k, top_k, bs):
    """MInference's block-sparse index, loop by loop: {(h, j): key blocks}.

    Follows microsoft/MInference, minference/ops/block_sparse_flash_attention.py, `_build_block_index`:
    1. zero-pad q and k to whole blocks and mean-pool each block of `bs` (a partial block's mean is
       its sum / bs);
    2. per head, score pooled q of block j . pooled k of block b, for b <= j only (diagonal included);
    3. keep the top min(top_k, blocks) per query block, nothing forced (the kernel masks causally).
    """
    _, H, T, D = q.shape
    G = H // k.shape[1]
    n = math.ceil(T / bs)
    pad = n * bs - T
    qp = torch.nn.functional.pad(q, (0, 0, 0, pad))
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad))
    out = {}
    for h in range(H):
        for j in range(n):
            qbar = qp[0, h, j * bs : (j + 1) * bs].mean(0)
            score = {b: float(qbar @ kp[0, h // G, b * bs : (b + 1) * bs].mean(0)) for b in range(j + 1)}
            out[h, j] = set(sorted(score, key=lambda b: -score[b])[:top_k])
    return out


@pytest.mark.parametrize("T", [500, 512])
def test_block_sparse_paper_selection_equals_reference_loop(T):
    q, k, _ = qkv(H=4, Hkv=2, T=T, D=16, seed=13)
    method = make("block-sparse", top_k=5, block_size=32)
    assert method.params.causal is False
    mask = method.support(q, k, ctx_of(q)).to_mask(math.ceil(T / 32))
    for (h, j), blocks in naive_minference_block_sparse(q, k, 5, 32).items():
        assert set(torch.nonzero(mask[0, h, j]).flatten().tolist()) == blocks, (h, j)


def test_block_sparse_paper_selection_of_a_planted_pattern():
    """Written out by hand: the question block (15) keeps key block 3 (key 100) as its one block."""
    T, bs = 512, 32
    q, k, v = planted_question(T)
    method = make("block-sparse", top_k=1, block_size=bs)
    mask = method.support(q, k, ctx_of(q)).to_mask(T // bs)
    assert set(torch.nonzero(mask[0, 0, 15]).flatten().tolist()) == {3}
    # the lagged estimate ranks block 15's keys with block 14's queries, which ignore key 100: it
    # keeps only its forced sink and diagonal blocks
    lagged = make("block-sparse", top_k=1, block_size=bs, causal=True).support(q, k, ctx_of(q)).to_mask(T // bs)
    assert set(torch.nonzero(lagged[0, 0, 15]).flatten().tolist()) == {0, 15}

"""TokenSelect: the soft vote, the paper's and the lagged chunk selection against naive loops, execution, density."""

from __future__ import annotations

import math

import pytest
import torch
from test_method_minference import planted_question
from test_method_power import qkv

from attnsieve.kernels import exact_cells, token_mask
from attnsieve.methods import LayerContext, make
from attnsieve.methods.tokenselect import select_tokens, soft_vote

from helpers import assert_close, masked_dense_reference


def naive_vote(rep, k, cand):
    """sum over a KV group's heads of each head's softmax over the candidates, one row at a time."""
    B, H, n, _ = rep.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hkv, n, Tk, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(n):
                idx = torch.nonzero(cand[b, i]).flatten()
                if len(idx) == 0:
                    continue
                s = torch.tensor([float(rep[b, h, i].double() @ k[b, h * Hkv // H, t].double()) for t in idx])
                out[b, h * Hkv // H, i, idx] += torch.softmax(s, 0)
    return out


def naive_tokenselect(q, k, bs, n_init, n_local, top_k, key_valid=None):
    """The keys each query chunk attends in TokenSelect's prefill, loop by loop: {(b, j): key positions}.

    Follows pzs19/TokenSelect, patcher/token_retrieval.py, `patched_radix_attention_extend_forward_flashinfer`
    (the prompt's queries in chunks of PREFILL_CHUNK_SIZE, each chunk's keys stored before its retrieval) and
    `TokenRetriever.retrieval_indices` / `TokenRetriever.get_topk_tokens`:
    1. the cached tokens are the keys up to the chunk's end, in order; n = their number;
    2. if n_init + top_k + n_local >= n, the chunk attends all of them;
    3. else the query fingerprint is the mean of the chunk's queries; every query head takes raw dot products
       with the candidates (cached tokens n_init .. n - n_local - 1), a softmax over them, and the softmaxes
       are summed over all heads; the chunk keeps the top_k candidates of that sum;
    4. the chunk attends the first n_init cached tokens, those top_k and the last n_local (causally per query).
    One list for all heads. Departures (in the method's docstring): head h scores KV head h // (H / Hkv) (the
    reference's Triton kernel reads KV head h % Hkv); padding keys are not cached tokens (the reference has
    none). With n_local >= bs, as here, the method's local window (at least the chunk's own block) is the
    reference's.
    """
    B, H, T, _ = q.shape
    G = H // k.shape[1]
    valid = torch.ones(B, T, dtype=torch.bool) if key_valid is None else key_valid
    out = {}
    for b in range(B):
        for j in range(math.ceil(T / bs)):
            end = min((j + 1) * bs, T)
            cached = [t for t in range(end) if valid[b, t]]
            n = len(cached)
            if n_init + top_k + n_local >= n:
                out[b, j] = set(cached)
                continue
            rows = [p for p in range(j * bs, end) if valid[b, p]]
            fingerprint = q[b, :, rows].double().mean(1)  # [H, D]
            cands = cached[n_init : n - n_local]
            vote = torch.zeros(len(cands), dtype=torch.float64)
            for h in range(H):
                vote += torch.softmax(torch.stack([fingerprint[h] @ k[b, h // G, t].double() for t in cands]), 0)
            top = {cands[i] for i in torch.topk(vote, top_k).indices.tolist()}
            out[b, j] = set(cached[:n_init]) | top | set(cached[n - n_local :])
    return out


def support_keys(support, T, key_valid=None):
    """{(b, hs, j): key positions} a support puts in scope for query chunk j, before its end (blocks and tokens)."""
    bs = support.block_size
    B, Hs, n_q, _ = support.blocks.shape
    valid = torch.ones(B, T, dtype=torch.bool) if key_valid is None else key_valid
    out = {}
    for b in range(B):
        for hs in range(Hs):
            for j in range(n_q):
                end = min((j + 1) * bs, T)
                keys = {t for kb in support.blocks[b, hs, j].tolist() if kb >= 0 for t in range(kb * bs, (kb + 1) * bs)}
                keys |= {t for t in support.tokens[b, hs, j].tolist() if t >= 0}
                out[b, hs, j] = {t for t in keys if t < end and valid[b, t]}
    return out


def naive_lagged_selection(q, k, bs, local_blocks, n_init, top_k, key_valid=None):
    """causal=True, per query chunk j (Tq == Tk): chunk j-1's real queries' mean, candidates before the local window."""
    B, H, T, _ = q.shape
    Hkv = k.shape[1]
    n_q = -(-T // bs)
    valid = torch.ones(B, T, dtype=torch.bool) if key_valid is None else key_valid
    chosen = [[[set() for _ in range(n_q)] for _ in range(Hkv)] for _ in range(B)]
    for b in range(B):
        real = torch.nonzero(valid[b]).flatten().tolist()
        sinks = set(real[:n_init])
        for j in range(1, n_q):
            prev = [p for p in range((j - 1) * bs, min(j * bs, T)) if valid[b, p]]
            cands = [t for t in real if t < (j - local_blocks + 1) * bs and t not in sinks]
            if not prev or not cands:
                continue
            rep = q[b, :, prev].double().mean(1)  # [H, D]
            for g in range(Hkv):
                vote = torch.zeros(len(cands), dtype=torch.float64)
                for h in range(g * H // Hkv, (g + 1) * H // Hkv):
                    vote += torch.softmax(torch.stack([rep[h] @ k[b, g, t].double() for t in cands]), 0)
                top = torch.topk(vote, min(top_k, len(cands))).indices.tolist()
                chosen[b][g][j] = {cands[i] for i in top}
    return chosen


@pytest.mark.parametrize("H,Hkv", [(4, 1), (4, 2), (2, 2)])
def test_soft_vote_equals_naive_loop(H, Hkv):
    g = torch.Generator().manual_seed(0)
    rep, k = torch.randn(2, H, 3, 8, generator=g), torch.randn(2, Hkv, 20, 8, generator=g)
    cand = torch.rand(2, 3, 20, generator=g) < 0.6
    cand[1, 2] = False  # a row with no candidate votes for nothing
    vote = soft_vote(rep, k, cand)
    ref = naive_vote(rep, k, cand)
    assert_close(vote.exp().double(), ref, atol=1e-6, rtol=1e-5)
    assert bool((vote[1, :, 2] == float("-inf")).all())


def test_soft_vote_does_not_let_one_large_head_dominate():
    # Head 0 has 10x larger logits; a plain sum of logits would follow it alone, the soft vote
    # gives each head one unit of mass, so head 1's clear favourite still ranks first.
    k = torch.eye(4)[None, None]  # 4 keys, one per channel
    rep = torch.tensor([[[10.0, 10.5, 0.0, 0.0]], [[0.0, 0.0, 5.0, 0.0]]])[None]  # [1, 2, 1, 4]
    vote = soft_vote(rep, k, torch.ones(1, 1, 4, dtype=torch.bool))
    assert int(vote[0, 0, 0].argmax()) == 2
    assert int((rep[0, :, 0] @ k[0, 0].T).sum(0).argmax()) == 1


@pytest.mark.parametrize("T", [300, 512])
@pytest.mark.parametrize("heads", [(4, 1), (4, 2)], ids=["GQA", "GQA2"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_paper_selection_equals_reference_loop(T, heads, padded):
    H, Hkv = heads
    q, k, _ = qkv(B=2, H=H, Hkv=Hkv, T=T, D=16, seed=11)
    valid = torch.ones(2, T, dtype=torch.bool)
    if padded:
        valid[1, :37] = False
    key_valid = valid if padded else None
    method = make("tokenselect", top_k=20, n_init=4, n_local=48, block_size=32)
    assert method.params.causal is False
    support = method.support(q, k, LayerContext(0, 0.25, key_valid=key_valid))
    got = support_keys(support, T, key_valid)
    ref = naive_tokenselect(q, k, 32, 4, 48, 20, key_valid)
    assert any(len(keys) < min((j + 1) * 32, T) for (_, j), keys in ref.items()), "the test must select"
    for (b, j), keys in ref.items():
        for hs in range(support.blocks.shape[1]):
            assert got[b, hs, j] == keys, (b, hs, j, sorted(got[b, hs, j] ^ keys))


def test_paper_selection_of_a_planted_pattern():
    """Written out by hand: the question chunk (15, the last 32 queries) keeps key 100 as its one selected token."""
    T, bs = 512, 32
    q, k, _ = planted_question(T)
    ctx = LayerContext(0, 32**-0.5)
    method = make("tokenselect", top_k=1, n_init=4, n_local=32, block_size=bs)
    keys = support_keys(method.support(q, k, ctx), T)
    # sinks 0..3, the selected key 100, the local window: the chunk's own 32 keys 480..511
    assert keys[0, 0, 15] == {0, 1, 2, 3, 100, *range(480, 512)}
    # chunk 1 has 64 cached keys, more than 4 + 1 + 32: its sinks, one of keys 4..31 and its own 32 keys
    assert len(keys[0, 0, 1]) == 4 + 1 + 32 and set(range(32, 64)) <= keys[0, 0, 1]
    # the leak-free form scores chunk 15 with chunk 14's queries, which ignore key 100
    lagged = make("tokenselect", top_k=1, n_init=4, n_local=32, block_size=bs, causal=True)
    lagged_keys = support_keys(lagged.support(q, k, ctx), T)
    assert 100 not in lagged_keys[0, 0, 15]


@pytest.mark.parametrize("heads", [(4, 1), (4, 2)], ids=["GQA", "GQA2"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_lagged_selection_equals_naive_loop(heads, padded):
    q, k, _ = qkv(B=2, H=heads[0], Hkv=heads[1], T=150, D=8, seed=1)
    valid = torch.ones(2, 150, dtype=torch.bool)
    if padded:
        valid[1, :37] = False
    ctx = LayerContext(0, 0.3, key_valid=valid if padded else None)
    got = select_tokens(q, k, ctx, 16, 2, 5, 7)  # [B, Hkv, NQ, 7]
    ref = naive_lagged_selection(q, k, 16, 2, 5, 7, valid)
    for b in range(2):
        for g in range(heads[1]):
            for j in range(got.shape[2]):
                assert set(got[b, g, j][got[b, g, j] >= 0].tolist()) == ref[b][g][j], (b, g, j)


def test_keeps_a_planted_heavy_token():
    q, k, v = qkv(T=1024, D=32, seed=2)
    q = q[:, :1, :1] + 0.3 * q  # neighbouring queries (and here heads) are correlated
    k[:, :, 211] = q[:, :, -64:].mean((1, 2)) * 6  # one key far back, dominant for the late queries
    v[:, :, 211] = 20.0  # ... carrying a distinctive value
    method = make("tokenselect", top_k=8, n_init=4, n_local=64, block_size=32, causal=True)
    ctx = LayerContext(0, 32**-0.5)
    tokens = select_tokens(q, k, ctx, 32, 2, 4, 8)
    assert bool((tokens[0, 0, 8:] == 211).any(-1).all())  # every chunk past it selects it
    res = method.prefill(q, k, v, ctx)
    ref, _ = masked_dense_reference(q, k, v, token_mask(torch.arange(1024), torch.arange(1024), causal=True,
                                                        window=None)[None, None], scale=32**-0.5)
    err = (res.out[:, :, -1] - ref[:, :, -1]).norm() / ref[:, :, -1].norm()
    assert err < 0.1, float(err)


@pytest.mark.parametrize("causal", [False, True], ids=["paper", "causal"])
@pytest.mark.parametrize("heads", [(4, 1), (4, 2)], ids=["GQA", "GQA2"])
@pytest.mark.parametrize("window", [None, 120], ids=["global", "sliding120"])
def test_execution_equals_masked_dense(causal, heads, window):
    H, Hkv = heads
    T, bs = 300, 16
    q, k, v = qkv(H=H, Hkv=Hkv, T=T, seed=3)
    valid = torch.ones(1, T, dtype=torch.bool)
    valid[0, :20] = False
    ctx = LayerContext(0, 0.25, window, valid)
    method = make("tokenselect", top_k=6, n_init=3, n_local=40, block_size=bs, causal=causal)
    res = method.prefill(q, k, v, ctx)
    pos = torch.arange(T)
    allowed = torch.zeros(1, H, T, T, dtype=torch.bool)
    if causal:
        tokens = select_tokens(q, k, ctx, bs, 3, 3, 6)
        # The implied mask: 3 local blocks, the first 3 real tokens, each chunk's selected tokens.
        for h in range(H):
            for p in range(T):
                j = p // bs
                keys = (pos // bs > j - 3) | (pos >= 20) & (pos < 23)
                keys[tokens[0, h * Hkv // H, j][tokens[0, h * Hkv // H, j] >= 0]] = True
                allowed[0, h, p] = keys
    else:
        chunk_keys = support_keys(method.support(q, k, ctx), T, valid)  # one list per KV head
        for h in range(H):
            for p in range(T):
                allowed[0, h, p, sorted(chunk_keys[0, h * Hkv // H, p // bs])] = True
    allowed &= token_mask(pos, pos, causal=True, window=window) & valid[:, None, None] & valid[:, None, :, None]
    ref, _ = masked_dense_reference(q, k, v, allowed, scale=0.25)
    assert_close(res.out[:, :, 20:], ref[:, :, 20:])
    assert res.cells == int(allowed.sum())


@pytest.mark.parametrize("causal", [False, True], ids=["paper", "causal"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_knob_lands_near_target(density, causal):
    q, k, v = qkv(T=2048, D=8, H=2, seed=4)
    res = make("tokenselect", density=density, causal=causal).prefill(q, k, v, LayerContext(0, 0.3))
    measured = res.cells / (2 * exact_cells(2048, 2048))
    assert 0.7 * density <= measured <= 1.3 * density, measured
    assert res.estimate_s > 0


def test_defaults_are_the_references_unscaled_budgets():
    """top_k 2048, n_init 128, n_local 512 and chunks of 512 at every length (config/*-token-retrieval.yaml,
    PREFILL_CHUNK_SIZE): at 4k the chunks ending by 2688 = 128 + 2048 + 512 tokens attend every earlier key,
    the later ones their 128 sinks, 2048 chosen tokens and their own block."""
    p = make("tokenselect").params
    assert (p.top_k, p.n_init, p.n_local, p.chunk(), p.causal) == (2048, 128, 512, 512, False)
    q, k, v = qkv(T=4096, D=4, H=1, seed=5)
    res = make("tokenselect").prefill(q, k, v, LayerContext(0, 0.5))
    later = sum(128 + 2048 + p % 512 + 1 for p in range(2560, 4096))
    assert res.cells == exact_cells(2560, 2560) + later


def test_causal_defaults_keep_chunks_of_64_and_the_unscaled_top_k():
    q, k, v = qkv(T=4096, D=4, H=1, seed=5)
    method = make("tokenselect", causal=True)
    assert method.params.chunk() == 64 and method.params.top_k == 2048
    res = method.prefill(q, k, v, LayerContext(0, 0.5))
    # per chunk j of 64 rows: 8 local blocks (diagonal included), then 128 sinks and min(2048, the rest)
    local = sum(min(p + 1, p % 64 + 1 + 7 * 64) for p in range(4096))
    before = [max(0, (j - 7) * 64) for j in range(64)]
    others = sum(64 * (min(128, n) + min(2048, max(0, n - 128))) for n in before)
    assert res.cells == local + others


@pytest.mark.parametrize("key,value", [("top_k", -1), ("n_init", -1), ("n_local", 0), ("block_size", 8),
                                       ("density", 0.0)])
def test_bad_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make("tokenselect", **{key: value})

"""TokenSelect: the soft vote and the lagged chunk selection against naive loops, execution, density."""

from __future__ import annotations

import pytest
import torch
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


def naive_selection(q, k, bs, local_blocks, n_init, top_k, key_valid=None):
    """Per query chunk j (Tq == Tk): mean of chunk j-1's real queries, candidates before the local window."""
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


@pytest.mark.parametrize("heads", [(4, 1), (4, 2)], ids=["GQA", "GQA2"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_selection_equals_naive_loop(heads, padded):
    q, k, _ = qkv(B=2, H=heads[0], Hkv=heads[1], T=150, D=8, seed=1)
    valid = torch.ones(2, 150, dtype=torch.bool)
    if padded:
        valid[1, :37] = False
    ctx = LayerContext(0, 0.3, key_valid=valid if padded else None)
    got = select_tokens(q, k, ctx, 16, 2, 5, 7)  # [B, Hkv, NQ, 7]
    ref = naive_selection(q, k, 16, 2, 5, 7, valid)
    for b in range(2):
        for g in range(heads[1]):
            for j in range(got.shape[2]):
                assert set(got[b, g, j][got[b, g, j] >= 0].tolist()) == ref[b][g][j], (b, g, j)


def test_keeps_a_planted_heavy_token():
    q, k, v = qkv(T=1024, D=32, seed=2)
    q = q[:, :1, :1] + 0.3 * q  # neighbouring queries (and here heads) are correlated
    k[:, :, 211] = q[:, :, -64:].mean((1, 2)) * 6  # one key far back, dominant for the late queries
    v[:, :, 211] = 20.0  # ... carrying a distinctive value
    method = make("tokenselect", top_k=8, n_init=4, n_local=64, block_size=32)
    ctx = LayerContext(0, 32**-0.5)
    tokens = select_tokens(q, k, ctx, 32, 2, 4, 8)
    assert bool((tokens[0, 0, 8:] == 211).any(-1).all())  # every chunk past it selects it
    res = method.prefill(q, k, v, ctx)
    ref, _ = masked_dense_reference(q, k, v, token_mask(torch.arange(1024), torch.arange(1024), causal=True,
                                                        window=None)[None, None], scale=32**-0.5)
    err = (res.out[:, :, -1] - ref[:, :, -1]).norm() / ref[:, :, -1].norm()
    assert err < 0.1, float(err)


@pytest.mark.parametrize("heads", [(4, 1), (4, 2)], ids=["GQA", "GQA2"])
@pytest.mark.parametrize("window", [None, 120], ids=["global", "sliding120"])
def test_execution_equals_masked_dense(heads, window):
    H, Hkv = heads
    T, bs = 300, 16
    q, k, v = qkv(H=H, Hkv=Hkv, T=T, seed=3)
    valid = torch.ones(1, T, dtype=torch.bool)
    valid[0, :20] = False
    ctx = LayerContext(0, 0.25, window, valid)
    method = make("tokenselect", top_k=6, n_init=3, n_local=40, block_size=bs)  # 3 local blocks
    res = method.prefill(q, k, v, ctx)
    tokens = select_tokens(q, k, ctx, bs, 3, 3, 6)
    # The implied mask: local blocks, the first 3 real tokens, each chunk's selected tokens.
    pos = torch.arange(T)
    allowed = torch.zeros(1, H, T, T, dtype=torch.bool)
    for h in range(H):
        for p in range(T):
            j = p // bs
            keys = (pos // bs > j - 3) | (pos >= 20) & (pos < 23)
            keys[tokens[0, h * Hkv // H, j][tokens[0, h * Hkv // H, j] >= 0]] = True
            allowed[0, h, p] = keys
    allowed &= token_mask(pos, pos, causal=True, window=window) & valid[:, None, None] & valid[:, None, :, None]
    ref, _ = masked_dense_reference(q, k, v, allowed, scale=0.25)
    assert_close(res.out[:, :, 20:], ref[:, :, 20:])
    assert res.cells == int(allowed.sum())


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_knob_lands_near_target(density):
    q, k, v = qkv(T=2048, D=8, H=2, seed=4)
    res = make("tokenselect", density=density).prefill(q, k, v, LayerContext(0, 0.3))
    measured = res.cells / (2 * exact_cells(2048, 2048))
    assert 0.7 * density <= measured <= 1.3 * density, measured
    assert res.estimate_s > 0


def test_default_top_k_scales_the_papers_2k_at_128k():
    q, k, v = qkv(T=4096, D=4, H=1, seed=5)
    ctx = LayerContext(0, 0.5)
    tokens = select_tokens(q, k, ctx, 64, 8, 128, 64)
    method = make("tokenselect")  # top_k None -> 2048 * 4096 / 131072 = 64 tokens per chunk
    res = method.prefill(q, k, v, ctx)
    rows = exact_cells(4096, 4096)
    local = sum(min(p + 1, (p % 64) + 1 + 7 * 64) for p in range(4096))
    sinks = sum(min(128, max(0, (p // 64 - 7) * 64)) for p in range(4096))
    chosen = sum(64 * int((tokens[0, 0, j] >= 0).sum()) for j in range(64))
    assert res.cells == local + sinks + chosen and res.cells < rows


@pytest.mark.parametrize("key,value", [("top_k", -1), ("n_init", -1), ("n_local", 0), ("block_size", 8),
                                       ("density", 0.0)])
def test_bad_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make("tokenselect", **{key: value})

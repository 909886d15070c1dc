"""longheads: chunk summaries and chunk selection against naive loops, planted chunk, masked dense, density."""

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


def naive_selection(q, k, v, valid, bs, cs, n_chunks, scale):
    """[B, H, NQ, NK] block mask: forced first / previous / current chunk plus the best-scoring ones."""
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
def test_selection_equals_naive_loop(padded):
    q, k, v = qkv(B=2, H=4, Hkv=1, T=400, seed=2)
    valid = torch.ones(2, 400, dtype=torch.bool)
    if padded:
        valid[0, :70] = False
    m = make("longheads", block_size=16, chunk_size=32, max_len=160)  # 5 chunks of 32 per query block
    ctx = ctx_for(q, valid if padded else None)
    got = m.support(q, k, ctx, v).to_mask(25)
    ref = naive_selection(q, k, v, valid, 16, 32, 5, ctx.scale)
    assert torch.equal(got, ref)


def test_attended_length_stays_within_max_len():
    q, k, v = qkv(T=1000, seed=3)
    m = make("longheads", block_size=16, chunk_size=64, max_len=256)
    mask = m.support(q, k, ctx_for(q), v).to_mask(63)
    assert int(mask.sum(-1).max()) * 16 <= 256
    assert bool(mask[..., 0].all())  # the first chunk is always kept
    dense = make("longheads", block_size=16, chunk_size=64, max_len=1024).support(q, k, ctx_for(q), v).to_mask(63)
    assert torch.equal(dense[0, 0], torch.ones(63, 63, dtype=torch.bool).tril())  # within max_len: dense


def test_planted_chunk_is_selected():
    q, k, v = qkv(T=2048, D=32, seed=4)
    u = torch.randn(32)
    q[:, :, 1500:] += 3 * u
    k[:, :, 512:768] += 3 * u  # chunk 2 of 256
    m = make("longheads", max_len=1024)  # 4 chunks: first, previous, current and one chosen
    mask = m.support(q, k, ctx_for(q), v).to_mask(32)[0]
    assert bool(mask[:, 25:, 8:12].all())  # rows past 1600 chose chunk 2 (blocks 8..11)


@pytest.mark.parametrize("window", [None, 90])
def test_execution_equals_masked_dense(window):
    q, k, v = qkv(B=2, T=300, seed=5)
    valid = torch.ones(2, 300, dtype=torch.bool)
    valid[1, :45] = False
    m = make("longheads", block_size=16, chunk_size=32, max_len=128)
    ctx = ctx_for(q, valid, window)
    res = m.prefill(q, k, v, ctx)
    mask = token_mask_from_blocks(m.support(q, k, ctx, v).to_mask(19), 4, 300, 16, valid)
    if window is not None:
        pos = torch.arange(300)
        mask &= pos[:, None] - pos[None, :] < window
    ref, _ = masked_dense_reference(q, k, v, mask)
    rows = mask.any(-1)
    assert_close(res.out[rows], ref[rows])
    assert res.cells == int(mask.sum())


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_lands_near_target(density):
    q, k, v = qkv(T=4096, D=32, seed=6)
    res = make("longheads", density=density).prefill(q, k, v, LayerContext(0, 32**-0.5))
    measured = res.cells / (4 * exact_cells(4096, 4096))
    assert 0.8 * density <= measured <= 1.2 * density + 0.01, measured


@pytest.mark.parametrize("key,value", [("chunk_size", 100), ("max_len", 256), ("density", 2.0), ("chunk_repr", "max")])
def test_bad_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make("longheads", **{key: value})

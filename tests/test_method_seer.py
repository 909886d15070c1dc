"""seer (untrained SeerAttention gate): gate vs a naive loop, planted block, masked dense, density."""

from __future__ import annotations

import math

import pytest
import torch

from attnsieve.kernels import exact_cells
from attnsieve.methods import make

from block_routing_helpers import ctx_for, qkv, token_mask_from_blocks
from helpers import assert_close, masked_dense_reference


def naive_gate_mask(q, k, valid, bs, scale, threshold, last_dense=True, sink=1):
    """The gate as loops: lagged avg-pooled query vs max/min/avg-pooled keys, block softmax, threshold."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    n = math.ceil(T / bs)
    mask = torch.zeros(B, H, n, n, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            g = h * Hkv // H
            for j in range(n):
                if not valid[b, j * bs : (j + 1) * bs].any():
                    continue
                if j > 0 and valid[b, (j - 1) * bs : j * bs].any():
                    qp = q[b, h, (j - 1) * bs : j * bs][valid[b, (j - 1) * bs : j * bs]].double().mean(0)
                else:
                    first = int(torch.nonzero(valid[b, j * bs : (j + 1) * bs])[0])
                    qp = q[b, h, j * bs + first].double()
                logits = {}
                for i in range(j):
                    keys = k[b, g, i * bs : (i + 1) * bs][valid[b, i * bs : (i + 1) * bs]].double()
                    if len(keys) == 0:
                        continue
                    feat = keys.max(0).values + keys.min(0).values + keys.mean(0)
                    logits[i] = float(qp @ feat) * scale / 3
                if logits:
                    z = torch.tensor(list(logits.values()), dtype=torch.float64)
                    p = torch.softmax(z, 0)
                    for (i, _), pi in zip(logits.items(), p, strict=True):
                        mask[b, h, j, i] = bool(pi > threshold)
                mask[b, h, j, j] = True
                real = [i for i in range(n) if valid[b, i * bs : (i + 1) * bs].any()]
                for i in real[:sink]:
                    mask[b, h, j, i] = i <= j
                if last_dense and j >= n - 2:
                    for i in range(j + 1):
                        mask[b, h, j, i] = bool(valid[b, i * bs : (i + 1) * bs].any())
    return mask


@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("heads", [(4, 1), (4, 4)], ids=["MQA", "MHA"])
@pytest.mark.parametrize("sink", [0, 1])
def test_gate_selection_equals_naive_loop(padded, heads, sink):
    q, k, _ = qkv(B=2, H=heads[0], Hkv=heads[1], T=170, seed=1)
    q = q * 3  # a sharper gate, so the threshold keeps some blocks and drops others
    valid = torch.ones(2, 170, dtype=torch.bool)
    if padded:
        valid[0, :40] = False
    m = make("seer", block_size=16, threshold=0.08, sink_blocks=sink)
    ctx = ctx_for(q, valid if padded else None)
    got = m.support(q, k, ctx).to_mask(11)
    ref = naive_gate_mask(q, k, valid, 16, ctx.scale, 0.08, sink=sink)
    assert torch.equal(got, ref)
    assert 0 < int(got.sum()) < int(ref.numel())  # the test exercises both outcomes


def test_planted_block_passes_the_threshold():
    q, k, v = qkv(T=1024, D=32, seed=2)
    u = torch.randn(32)
    q[:, :, 500:] += 4 * u
    k[:, :, 256:320] += 4 * u  # block 4
    sup = make("seer", threshold=0.5, last_block_dense=False).support(q, k, ctx_for(q))
    mask = sup.to_mask(16)[0]
    assert bool(mask[:, 9:, 4].all())  # rows whose lagged query is past 500 keep block 4
    assert int(mask.sum()) < 3 * 16 * 4  # and little else besides the diagonal


def test_last_two_query_blocks_are_dense():
    q, k, _ = qkv(T=640, D=16, seed=3)
    mask = make("seer", threshold=0.99).support(q, k, ctx_for(q)).to_mask(10)[0]
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    assert torch.equal(mask[:, 8:], causal[8:].expand(4, -1, -1))
    assert int(mask[:, :8].sum()) < int(causal[:8].sum()) * 4


@pytest.mark.parametrize("density", [None, 0.2])
def test_execution_equals_masked_dense(density):
    q, k, v = qkv(B=2, T=200, seed=4)
    valid = torch.ones(2, 200, dtype=torch.bool)
    valid[1, :50] = False
    m = make("seer", block_size=16, threshold=0.05, density=density)
    ctx = ctx_for(q * 3, valid)
    res = m.prefill(q * 3, k, v, ctx)
    mask = token_mask_from_blocks(m.support(q * 3, k, ctx).to_mask(13), 4, 200, 16, valid)
    ref, _ = masked_dense_reference(q * 3, k, v, mask)
    rows = mask.any(-1)
    assert_close(res.out[rows], ref[rows])
    assert res.cells == int(mask.sum())


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_lands_near_target(density):
    q, k, v = qkv(T=4096, D=32, seed=5)
    res = make("seer", density=density).prefill(q, k, v, ctx_for(q))
    measured = res.cells / (4 * exact_cells(4096, 4096))
    assert 0.9 * density <= measured <= 1.1 * density + 0.01, measured


@pytest.mark.parametrize("key,value", [("threshold", 1.0), ("threshold", -0.1), ("density", 0.0), ("block_size", 600),
                                       ("sink_blocks", -2)])
def test_bad_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make("seer", **{key: value})

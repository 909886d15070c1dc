"""seer (untrained SeerAttention gate): the paper's gate and the lagged gate vs naive loops, planted blocks,
masked dense, density."""

from __future__ import annotations

import math

import pytest
import torch

from attnsieve.kernels import exact_cells
from attnsieve.methods import make

from block_routing_helpers import ctx_for, qkv, token_mask_from_blocks
from helpers import assert_close, masked_dense_reference


def naive_seer_gate(q, k, valid, bs, scale, threshold, last_dense=True, sink=1):
    """SeerAttention's prefill gate, untrained, loop by loop: [B, H, NQ, NK] block mask.

    Follows microsoft/SeerAttention: seer_attn/prefill_sparse/attn_gate.py `AttnGate.forward` (pooling
    and scores), seer_attn/prefill_sparse/llama/modeling_llama_seerattn.py `_seerattn_update_causal_mask`
    (the block-causal gate mask) and seer_attn/modules/common.py `get_sparse_attn_mask_from_threshold`:
    1. q of query block j average-pooled over the block's (real) queries, its OWN block;
    2. each key block i max-, min- and average-pooled over its real keys ([k_max, k_min, k_avg]);
    3. the untrained gate's logit q_avg . (k_max + k_min + k_avg) * scale / 3 for i = 0..j, the
       diagonal block j included (the reference masks the strict upper triangle only);
    4. softmax over those key blocks; keep i where the probability exceeds `threshold`;
    5. last_block_dense: the last two query-block rows keep every causal block; then the lower
       triangle. Ours on top: the first `sink` real key blocks (the reference forces nothing).
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    n = math.ceil(T / bs)
    mask = torch.zeros(B, H, n, n, dtype=torch.bool)
    for b in range(B):
        real = [i for i in range(n) if valid[b, i * bs : (i + 1) * bs].any()]
        for h in range(H):
            g = h * Hkv // H
            for j in real:
                qp = q[b, h, j * bs : (j + 1) * bs][valid[b, j * bs : (j + 1) * bs]].double().mean(0)
                logits = {}
                for i in (i for i in real if i <= j):
                    keys = k[b, g, i * bs : (i + 1) * bs][valid[b, i * bs : (i + 1) * bs]].double()
                    feat = keys.max(0).values + keys.min(0).values + keys.mean(0)
                    logits[i] = float(qp @ feat) * scale / 3
                p = torch.softmax(torch.tensor(list(logits.values()), dtype=torch.float64), 0)
                for i, pi in zip(logits, p, strict=True):
                    mask[b, h, j, i] = bool(pi > threshold)
                for i in real[:sink]:
                    mask[b, h, j, i] = i <= j
                if last_dense and j >= n - 2:
                    for i in real:
                        mask[b, h, j, i] = i <= j
    return mask


def naive_lagged_gate_mask(q, k, valid, bs, scale, threshold, last_dense=True, sink=1):
    """The causal=True gate as loops: lagged avg-pooled query vs max/min/avg-pooled keys, block softmax."""
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
def test_lagged_gate_selection_equals_naive_loop(padded, heads, sink):
    q, k, _ = qkv(B=2, H=heads[0], Hkv=heads[1], T=170, seed=1)
    q = q * 3  # a sharper gate, so the threshold keeps some blocks and drops others
    valid = torch.ones(2, 170, dtype=torch.bool)
    if padded:
        valid[0, :40] = False
    m = make("seer", block_size=16, threshold=0.08, sink_blocks=sink, causal=True)
    ctx = ctx_for(q, valid if padded else None)
    got = m.support(q, k, ctx).to_mask(11)
    ref = naive_lagged_gate_mask(q, k, valid, 16, ctx.scale, 0.08, sink=sink)
    assert torch.equal(got, ref)
    assert 0 < int(got.sum()) < int(ref.numel())  # the test exercises both outcomes


@pytest.mark.parametrize("T", [400, 512])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["GQA", "MHA"])
@pytest.mark.parametrize("sink", [0, 1])
def test_paper_gate_selection_equals_reference_loop(T, padded, heads, sink):
    q, k, _ = qkv(B=2, H=heads[0], Hkv=heads[1], T=T, D=16, seed=11)
    q = q * 8  # a sharper gate (block means of random queries are small), so the threshold drops blocks
    valid = torch.ones(2, T, dtype=torch.bool)
    if padded:
        valid[1, :57] = False
    m = make("seer", block_size=32, threshold=0.1, sink_blocks=sink)
    assert m.params.causal is False
    ctx = ctx_for(q, valid if padded else None)
    got = m.support(q, k, ctx).to_mask(math.ceil(T / 32))
    ref = naive_seer_gate(q, k, valid, 32, ctx.scale, 0.1, sink=sink)
    assert torch.equal(got, ref)
    assert 0 < int(got.sum()) < int(ref.numel())  # the test exercises both outcomes
    diag = torch.diagonal(got, dim1=-2, dim2=-1)[:, :, :-2]  # rows not made dense
    assert not bool(diag.all()), "the diagonal block is gated, not forced"


def planted_question(T=512, D=32, bs=32, key_block=3, seed=12):
    """Random q/k where only the last query block (the 'question') aligns with one key block.

    The keys of block `key_block` all carry 3u and no other key or query has a component along u,
    except the question's queries, which carry 4u. Every other logit of the gate is small noise.
    """
    q, k, v = qkv(H=1, Hkv=1, T=T, D=D, seed=seed)
    u = torch.nn.functional.normalize(torch.ones(D), dim=0) * D**0.5
    q, k = 0.3 * q, 0.3 * k
    q = q - (q @ u)[..., None] * u / D
    k = k - (k @ u)[..., None] * u / D
    k[:, :, key_block * bs : (key_block + 1) * bs] += 3 * u
    q[:, :, -bs:] += 4 * u
    return q, k, v


def test_paper_gate_of_a_planted_pattern():
    """Written out by hand: the question block (15) gates key block 3 open and nothing else, not even
    its own diagonal block; the leak-free gate of block 15 reads block 14's queries and misses it."""
    T, bs = 512, 32
    q, k, v = planted_question(T, bs=bs)
    params = dict(block_size=bs, threshold=0.5, last_block_dense=False, sink_blocks=0)
    mask = make("seer", **params).support(q, k, ctx_for(q)).to_mask(T // bs)
    assert set(torch.nonzero(mask[0, 0, 15]).flatten().tolist()) == {3}
    lagged = make("seer", causal=True, **params).support(q, k, ctx_for(q)).to_mask(T // bs)
    assert set(torch.nonzero(lagged[0, 0, 15]).flatten().tolist()) == {15}  # the forced diagonal only


def test_lagged_planted_block_passes_the_threshold():
    q, k, v = qkv(T=1024, D=32, seed=2)
    u = torch.randn(32)
    q[:, :, 500:] += 4 * u
    k[:, :, 256:320] += 4 * u  # block 4
    sup = make("seer", threshold=0.5, last_block_dense=False, causal=True).support(q, k, ctx_for(q))
    mask = sup.to_mask(16)[0]
    assert bool(mask[:, 9:, 4].all())  # rows whose lagged query is past 500 keep block 4
    assert int(mask.sum()) < 3 * 16 * 4  # and little else besides the diagonal


@pytest.mark.parametrize("causal", [False, True])
def test_last_two_query_blocks_are_dense(causal):
    q, k, _ = qkv(T=640, D=16, seed=3)
    mask = make("seer", threshold=0.99, causal=causal).support(q, k, ctx_for(q)).to_mask(10)[0]
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    assert torch.equal(mask[:, 8:], causal[8:].expand(4, -1, -1))
    assert int(mask[:, :8].sum()) < int(causal[:8].sum()) * 4


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("density", [None, 0.2])
def test_execution_equals_masked_dense(density, causal):
    q, k, v = qkv(B=2, T=200, seed=4)
    valid = torch.ones(2, 200, dtype=torch.bool)
    valid[1, :50] = False
    m = make("seer", block_size=16, threshold=0.05, density=density, causal=causal)
    ctx = ctx_for(q * 3, valid)
    res = m.prefill(q * 3, k, v, ctx)
    mask = token_mask_from_blocks(m.support(q * 3, k, ctx).to_mask(13), 4, 200, 16, valid)
    ref, _ = masked_dense_reference(q * 3, k, v, mask)
    rows = mask.any(-1)
    assert_close(res.out[rows], ref[rows])
    assert res.cells == int(mask.sum())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_lands_near_target(density, causal):
    q, k, v = qkv(T=4096, D=32, seed=5)
    res = make("seer", density=density, causal=causal).prefill(q, k, v, ctx_for(q))
    measured = res.cells / (4 * exact_cells(4096, 4096))
    assert 0.9 * density <= measured <= 1.1 * density + 0.01, measured


@pytest.mark.parametrize("key,value", [("threshold", 1.0), ("threshold", -0.1), ("density", 0.0), ("block_size", 600),
                                       ("sink_blocks", -2)])
def test_bad_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make("seer", **{key: value})

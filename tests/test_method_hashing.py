"""hyperattention and lsh against slow per-query references, plus their characteristic behaviour."""

from __future__ import annotations

import pytest
import torch

from attnsieve.kernels import dense_attention, exact_cells
from attnsieve.methods import LayerContext, make
from attnsieve.methods._hashing import (
    angular_hash,
    causal_split,
    generator,
    gray_rank,
    locate,
    predicted_density,
)
from attnsieve.methods.hyperattention import budget, quadrant_cost
from attnsieve.methods.lsh import budget as lsh_budget

from helpers import assert_close


def qkv(B=1, H=4, Hkv=1, T=150, D=16, seed=0, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g) * sharp
    return q, torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)


def run(method, q, k, v, window=None, key_valid=None, layer=0):
    return method.prefill(q, k, v, LayerContext(layer, q.shape[-1] ** -0.5, window, key_valid))


def weighted_reference(q, k, v, weights, scale):
    """sum_j w_j e^{s_j} v_j / sum_j w_j e^{s_j} for explicit per-(query, key) weights [B, H, Tq, Tk]."""
    G = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(G, 1).double()
    vv = v.repeat_interleave(G, 1).double()
    s = (q.double() @ kk.transpose(-1, -2)) * scale
    s = torch.where(weights > 0, s + torch.log(weights.clamp_min(1e-300)), float("-inf"))
    return (torch.softmax(s, -1) @ vv).float()


# ---------------------------------------------------------------- helpers


def test_gray_rank_orders_buckets_one_bit_apart():
    rank = gray_rank(5)
    codes = torch.argsort(rank)  # bucket codes in Gray order
    flips = codes[1:] ^ codes[:-1]
    assert sorted(rank.tolist()) == list(range(32))
    assert all(bin(int(f)).count("1") == 1 for f in flips)


def test_locate_finds_the_nearest_key_or_its_bucket_middle():
    vals = torch.tensor([[1.0, 1.0, 1.0, 4.0, 9.0, 99.0]])  # last is padding (sentinel)
    n_real = torch.tensor([5])
    x = torch.tensor([[1.0, 3.0, 2.0, 8.0, 50.0, -5.0]])
    assert locate(vals, n_real, x).tolist() == [[1, 3, 2, 4, 4, 0]]
    assert locate(vals, torch.tensor([0]), x).tolist() == [[-1] * 6]


def test_causal_split_pads_to_leaf_times_power_of_two():
    s = causal_split(300, 32)
    assert s.levels == 4 and s.leaf == 32 and s.padded == 512
    assert causal_split(300, 300).levels == 0
    s = causal_split(8192, 4096)
    assert (s.leaf, s.levels) == (4096, 1)


# ---------------------------------------------------------------- hyperattention


def hyper_reference(q, k, v, p, layer=0, key_valid=None, window=None):
    """Per query, the weights the paper's estimator gives each key, built by loops."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    m, bs, s = budget(p, T, T)
    split = causal_split(T, m)
    valid = torch.ones(B, T, dtype=torch.bool) if key_valid is None else key_valid
    proj = torch.randn(D, p.lsh_num_projs, generator=generator(p.seed, layer))
    rank = gray_rank(p.lsh_num_projs)
    weights = torch.zeros(B, H, T, T, dtype=torch.float64)
    leaf = split.leaf if split.levels else T
    draws, sorted_cache = {}, {}
    for level in range(split.levels):
        n_seg = split.padded // (2 * (split.leaf << level))
        draws[level] = torch.rand(Hkv, G, n_seg, s, generator=generator(p.seed, layer, 1000 + level))
    for b in range(B):
        for h in range(H):
            kv, g = h // G, h % G
            for t in range(T):
                if not valid[b, t]:
                    continue

                def see(j, b=b, t=t):
                    return valid[b, j] and j <= t and (window is None or t - j < window)

                a = (t // leaf) * leaf
                for j in range(a, t + 1):
                    weights[b, h, t, j] += see(j)
                for level in range(split.levels):
                    w = split.leaf << level
                    start = (t // (2 * w)) * 2 * w
                    if t - start < w:
                        continue
                    keys = list(range(start, start + w))
                    if w < m:
                        for j in keys:
                            weights[b, h, t, j] += see(j)
                        continue
                    real = [j for j in keys if valid[b, j]]
                    if not real:
                        continue
                    key = (b, kv, level, start)
                    if key not in sorted_cache:
                        hk_sorted, order = angular_hash(k[b, kv, real], proj, rank).sort(stable=True)
                        sorted_cache[key] = (hk_sorted, [real[i] for i in order.tolist()])
                    hk_sorted, sorted_keys = sorted_cache[key]
                    hq = angular_hash(q[b, h, t], proj, rank).view(1, 1)
                    pos = int(locate(hk_sorted[None], torch.tensor([len(real)]), hq)[0, 0])
                    blk = pos // bs
                    mine = set(sorted_keys[blk * bs : (blk + 1) * bs])
                    for j in mine:
                        weights[b, h, t, j] += see(j)
                    if s == 0 or len(real) <= bs:
                        continue
                    u = draws[level][kv, g, start // (2 * w)]
                    for x in u.tolist():
                        j = sorted_keys[min(int(x * len(real)), len(real) - 1)]
                        if j not in mine and see(j):
                            weights[b, h, t, j] += len(real) / s
    return weights


@pytest.mark.parametrize(
    "heads,window,padded",
    [((4, 1), None, False), ((4, 2), None, True), ((2, 2), 70, False)],
    ids=["GQA", "GQA-padded", "MHA-sliding70"],
)
def test_hyperattention_equals_its_slow_reference(heads, window, padded):
    q, k, v = qkv(B=2 if padded else 1, H=heads[0], Hkv=heads[1], T=150, sharp=2.0)
    key_valid = None
    if padded:
        key_valid = torch.ones(2, 150, dtype=torch.bool)
        key_valid[1, :23] = False
    method = make("hyperattention", min_seq_len=16, block_size=16, sample_size=8, lsh_num_projs=3)
    res = run(method, q, k, v, window=window, key_valid=key_valid, layer=3)
    weights = hyper_reference(q, k, v, method.params, layer=3, key_valid=key_valid, window=window)
    ref = weighted_reference(q, k, v, weights, q.shape[-1] ** -0.5)
    rows = slice(None) if key_valid is None else slice(23, None)
    assert_close(res.out[-1, :, rows], ref[-1, :, rows], atol=1e-5, rtol=1e-4)
    assert_close(res.out[0], ref[0], atol=1e-5, rtol=1e-4)


def test_hyperattention_exact_below_min_seq_len_also_for_chunked_queries():
    q, k, v = qkv(T=200)
    method = make("hyperattention", min_seq_len=200)
    res = run(method, q[:, :, -50:], k, v)
    ref, _ = dense_attention(q[:, :, -50:], k, v)
    assert_close(res.out, ref)
    assert res.cells == 4 * exact_cells(50, 200)


def test_hyperattention_chunked_queries_match_the_full_call():
    """Queries at the end of the keys (Tq < Tk) get the outputs the full call gives them."""
    q, k, v = qkv(T=200, sharp=2.0)
    method = make("hyperattention", min_seq_len=16, block_size=16, sample_size=8)
    full = run(method, q, k, v).out
    part = run(method, q[:, :, -70:], k, v).out
    assert_close(part, full[:, :, -70:])


def test_hyperattention_error_falls_as_blocks_and_samples_grow():
    q, k, v = qkv(T=512, D=32, sharp=3.0, seed=4)
    ref, _ = dense_attention(q, k, v)
    errs = []
    for bs, s in [(16, 16), (64, 64), (256, 256)]:
        out = run(make("hyperattention", min_seq_len=32, block_size=bs, sample_size=s), q, k, v).out
        errs.append(float((out - ref).norm() / ref.norm()))
    assert errs[0] > errs[1] > errs[2], errs


def test_hyperattention_block_holds_a_key_that_shares_the_query_hash():
    """A distant key parallel to the last query lands in its hash block, so its value dominates."""
    q, k, v = qkv(H=1, T=512, D=32, seed=5)
    k[0, 0, 40] = q[0, 0, -1] * 4  # far outside the exact leaves
    v[0, 0, 40] = 50.0
    res = run(make("hyperattention", min_seq_len=64, block_size=16, sample_size=0), q, k, v)
    ref, _ = dense_attention(q, k, v)
    assert_close(res.out[0, 0, -1], ref[0, 0, -1], atol=0.5, rtol=0.05)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_hyperattention_density_knob_lands_near_target(density):
    q, k, v = qkv(T=2048, D=32, seed=6)
    res = run(make("hyperattention", density=density), q, k, v)
    measured = res.cells / (4 * exact_cells(2048, 2048))
    assert 0.7 * density <= measured <= 1.3 * density, measured


def test_density_prediction_matches_measured_cells_without_padding():
    q, k, v = qkv(T=700, seed=7)
    method = make("hyperattention", min_seq_len=40, block_size=32, sample_size=0)
    measured = run(method, q, k, v).cells / (4 * exact_cells(700, 700))
    assert measured == pytest.approx(predicted_density(700, 700, 40, quadrant_cost(32, 0)), rel=1e-9)


# ---------------------------------------------------------------- lsh (SMYRF)


def lsh_reference(q, k, v, p, layer=0, key_valid=None, window=None):
    """Per query, the union of its clusters over the hash rounds (each key once), built by loops."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    m, n_hashes, kcs = lsh_budget(p, T, T)
    split = causal_split(T, m)
    valid = torch.ones(B, T, dtype=torch.bool) if key_valid is None else key_valid
    proj = torch.randn(p.n_hashes, D + 2, generator=generator(p.seed, layer))[:n_hashes]
    leaf = split.leaf if split.levels else T
    weights = torch.zeros(B, H, T, T, dtype=torch.float64)
    cache = {}
    for b in range(B):
        for h in range(H):
            kv = h // G
            for t in range(T):
                if not valid[b, t]:
                    continue

                def see(j, b=b, t=t):
                    return bool(valid[b, j]) and j <= t and (window is None or t - j < window)

                seen = set(range((t // leaf) * leaf, t + 1))
                for level in range(split.levels):
                    w = split.leaf << level
                    start = (t // (2 * w)) * 2 * w
                    if t - start < w:
                        continue
                    keys = [j for j in range(start, start + w) if valid[b, j]]
                    if w < m:
                        seen |= set(keys)
                        continue
                    if not keys:
                        continue
                    if (b, kv, level, start) not in cache:
                        firsts = [q[b, kv * G + g, j] for g in range(G) for j in range(start, start + w)
                                  if valid[b, j] and j >= 0]
                        mk2 = max(float(k[b, kv, j].pow(2).sum()) for j in keys)
                        mq2 = max(float(x.pow(2).sum()) for x in firsts) if firsts else mk2
                        r2 = mq2 + mk2
                        kk = k[b, kv, keys]
                        ext = (r2 - kk.pow(2).sum(-1)).clamp_min(0).sqrt()
                        hk = kk @ proj[:, :D].T + ext[:, None] * proj[:, D]  # [n, rounds]
                        rounds = []
                        for r in range(n_hashes):
                            hs, order = hk[:, r].sort(stable=True)
                            rounds.append((hs, [keys[i] for i in order.tolist()]))
                        cache[(b, kv, level, start)] = (r2, rounds)
                    r2, rounds = cache[(b, kv, level, start)]
                    ext_q = (r2 - q[b, h, t].pow(2).sum()).clamp_min(0).sqrt()
                    for r, (hs, sorted_keys) in enumerate(rounds):
                        hq = q[b, h, t] @ proj[r, :D] + ext_q * proj[r, D + 1]
                        pos = int(locate(hs[None], torch.tensor([len(keys)]), hq.view(1, 1))[0, 0])
                        c = pos // kcs
                        seen |= set(sorted_keys[c * kcs : (c + 1) * kcs])
                for j in seen:
                    weights[b, h, t, j] = float(see(j))
    return weights


@pytest.mark.parametrize(
    "heads,window,padded",
    [((4, 1), None, False), ((4, 2), None, True), ((2, 2), 70, False)],
    ids=["GQA", "GQA-padded", "MHA-sliding70"],
)
def test_lsh_equals_attention_over_the_union_of_its_clusters(heads, window, padded):
    """Rounds merge without double counting: attention over the union of a query's clusters."""
    q, k, v = qkv(B=2 if padded else 1, H=heads[0], Hkv=heads[1], T=150, sharp=2.0)
    key_valid = None
    if padded:
        key_valid = torch.ones(2, 150, dtype=torch.bool)
        key_valid[1, :23] = False
    method = make("lsh", min_seq_len=16, k_cluster_size=8, n_hashes=3, q_cluster_size=5)
    res = run(method, q, k, v, window=window, key_valid=key_valid, layer=2)
    weights = lsh_reference(q, k, v, method.params, layer=2, key_valid=key_valid, window=window)
    ref = weighted_reference(q, k, v, weights, q.shape[-1] ** -0.5)
    rows = slice(None) if key_valid is None else slice(23, None)
    assert_close(res.out[-1, :, rows], ref[-1, :, rows], atol=1e-5, rtol=1e-4)
    assert_close(res.out[0], ref[0], atol=1e-5, rtol=1e-4)
    real_rows = (torch.ones(weights.shape[:3], dtype=torch.bool) if key_valid is None
                 else key_valid[:, None, :].expand(weights.shape[:3]))
    assert res.cells == int((weights > 0).sum(-1)[real_rows].sum())  # each (query, key) once


def test_lsh_error_falls_as_rounds_grow():
    q, k, v = qkv(T=512, D=32, sharp=3.0, seed=8)
    ref, _ = dense_attention(q, k, v)
    errs = [
        float((run(make("lsh", min_seq_len=32, k_cluster_size=16, n_hashes=n), q, k, v).out - ref).norm() / ref.norm())
        for n in (1, 4, 16)
    ]
    assert errs[0] > errs[1] > errs[2], errs


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_lsh_density_knob_lands_near_target(density):
    q, k, v = qkv(T=2048, D=32, seed=6)
    res = run(make("lsh", density=density), q, k, v)
    measured = res.cells / (4 * exact_cells(2048, 2048))
    assert 0.7 * density <= measured <= 1.3 * density, measured

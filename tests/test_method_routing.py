"""routing (Routing Transformer, training-free): k-means, routed attention vs masked dense, density."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnsieve.kernels import exact_cells
from attnsieve.methods import LayerContext, make
from attnsieve.methods.routing import OnlineSphericalKMeans

from block_routing_helpers import ctx_for, qkv
from helpers import assert_close, masked_dense_reference


def planted_points(n_per, centers, noise, seed):
    g = torch.Generator().manual_seed(seed)
    C, D = centers.shape
    labels = torch.arange(C).repeat_interleave(n_per)
    x = centers[labels] + noise * torch.randn(C * n_per, D, generator=g)
    perm = torch.randperm(C * n_per, generator=g)
    return F.normalize(x[perm], dim=-1), labels[perm]


def purity(assign, labels, K):
    """Fraction of points whose cluster's majority label is their own."""
    good = 0
    for c in range(K):
        members = labels[assign == c]
        if len(members):
            good += int(torch.bincount(members).max())
    return good / len(labels)


def test_kmeans_converges_on_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(6, 32, generator=g), dim=-1)
    x, labels = planted_points(50, centers, 0.15, seed=1)
    km = OnlineSphericalKMeans(1, 1, 6, 32, "cpu")
    km.fold(x[None, None], torch.ones(1, 1, 300, dtype=torch.bool), iters=10)
    a = km.assign(x[None, None])[0, 0]
    assert purity(a, labels, 6) == 1.0
    assert len(set(a.tolist())) == 6
    # centroids sit on the planted directions
    sims = km.means[0, 0] @ centers.T
    assert bool((sims.max(0).values > 0.95).all())


def test_online_fold_tracks_later_chunks():
    """Points of a later chunk around slightly moved directions keep their clusters."""
    g = torch.Generator().manual_seed(2)
    centers = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    moved = F.normalize(centers + 0.1 * torch.randn(4, 16, generator=g), dim=-1)
    x1, l1 = planted_points(40, centers, 0.1, seed=3)
    x2, l2 = planted_points(40, moved, 0.1, seed=4)
    km = OnlineSphericalKMeans(1, 1, 4, 16, "cpu")
    ones = torch.ones(1, 1, 160, dtype=torch.bool)
    km.fold(x1[None, None], ones, iters=10)
    first = km.assign(x1[None, None])[0, 0]
    km.fold(x2[None, None], ones, iters=1)
    assert purity(km.assign(x2[None, None])[0, 0], l2, 4) == 1.0
    assert torch.equal(km.assign(x1[None, None])[0, 0], first)  # same labels for the earlier points
    assert int(km.counts.sum()) == 320


def test_empty_clusters_are_reseeded_from_new_points():
    x = F.normalize(torch.randn(1, 1, 30, 8, generator=torch.Generator().manual_seed(5)), dim=-1)
    ok = torch.zeros(1, 1, 30, dtype=torch.bool)
    ok[..., :2] = True  # two real points for four clusters: two clusters stay empty
    km = OnlineSphericalKMeans(1, 1, 4, 8, "cpu")
    km.fold(x, ok, iters=3)
    assert int(km.active().sum()) <= 2
    km.fold(x, torch.ones_like(ok), iters=1)
    assert int(km.active().sum()) == 4


def test_padding_points_are_ignored():
    x = F.normalize(torch.randn(1, 1, 20, 8), dim=-1)
    ok = torch.zeros(1, 1, 20, dtype=torch.bool)
    ok[..., 10:] = True
    x_bad = x.clone()
    x_bad[..., :10, :] = F.normalize(torch.randn(1, 1, 10, 8), dim=-1)
    a, b = OnlineSphericalKMeans(1, 1, 3, 8, "cpu"), OnlineSphericalKMeans(1, 1, 3, 8, "cpu")
    a.fold(x, ok, 5)
    b.fold(x_bad, ok, 5)
    assert torch.equal(a.means, b.means)


def naive_routing_mask(m, q, k, key_valid):
    """[B, H, T, T] token mask of the routing rule, written as loops over chunks, heads and tokens.

    The centroids come from the same online k-means (tested above); everything else (balanced
    membership, nearest-centroid routing, local and first-chunk parts) is recomputed here.
    """
    p = m.params
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    bs = p.block_size
    cs = p.chunk_size or max(4 * bs, round(T / 8 / bs) * bs)
    K = p.num_clusters or max(1, round(math.sqrt(T)))
    valid = torch.ones(B, T, dtype=torch.bool) if key_valid is None else key_valid
    kn, qn = F.normalize(k.float(), dim=-1), F.normalize(q.float(), dim=-1)
    km = OnlineSphericalKMeans(B, H, K, D, "cpu")
    mask = torch.zeros(B, H, T, T, dtype=torch.bool)
    pos = torch.arange(T)
    local_start = (pos // bs - p.local_blocks + 1) * bs
    key_prefix = F.pad(valid.long().cumsum(-1), (1, 0))
    for c in range(math.ceil(T / cs)):
        s, e = c * cs, min((c + 1) * cs, T)
        for i in range(s, e):  # local blocks (or the whole causal row in the first chunk)
            lo = 0 if c == 0 else max(0, int(local_start[i]))
            mask[:, :, i, lo : i + 1] = True
        if c >= 1:
            w = m._cluster_keys(key_prefix, pos[s:e], valid[:, s:e], s, K)
            for b in range(B):
                for h in range(H):
                    act = km.counts[b, h] > 0
                    mu = km.means[b, h]
                    kk = kn[b, h * Hkv // H]

                    def nearest(x, mu=mu, act=act):
                        sims = [float(x @ mu[j]) if act[j] else -math.inf for j in range(K)]
                        return max(range(K), key=lambda j: sims[j]) if act.any() else -1

                    members = {j: set() for j in range(K)}
                    for j in range(K):
                        if not act[j]:
                            continue
                        past = [t for t in range(s) if valid[b, t]]
                        past.sort(key=lambda t, j=j: -float(kk[t] @ mu[j]))
                        members[j] |= set(past[: int(w[b])])
                    for t in range(s, e):
                        if valid[b, t] and nearest(kk[t]) >= 0:
                            members[nearest(kk[t])].add(t)
                    for i in range(s, e):
                        if not valid[b, i] or nearest(qn[b, h, i]) < 0:
                            continue
                        for t in members[nearest(qn[b, h, i])]:
                            if t <= i and t < local_start[i]:
                                mask[b, h, i, t] = True
        if c < math.ceil(T / cs) - 1:
            G = H // Hkv
            xk = kn[:, :, None, s:e].expand(B, Hkv, G, e - s, D).reshape(B, H, e - s, D)
            ok = valid[:, None, s:e].expand(B, H, -1)
            km.fold(torch.cat([xk, qn[:, :, s:e]], 2), torch.cat([ok, ok], 2), p.kmeans_iters if c == 0 else 1)
    return mask & valid[:, None, None, :] & (pos[None, :] <= pos[:, None])


@pytest.mark.parametrize("heads", [(4, 1), (2, 2)], ids=["MQA", "MHA"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_routed_attention_equals_masked_dense(heads, padded):
    q, k, v = qkv(B=2, H=heads[0], Hkv=heads[1], T=230, D=8, seed=5)
    valid = torch.ones(2, 230, dtype=torch.bool)
    if padded:
        valid[1, :57] = False
    m = make("routing", block_size=16, num_clusters=5, cluster_keys=12, local_blocks=1)
    res = m.prefill(q, k, v, ctx_for(q, valid if padded else None))
    mask = naive_routing_mask(m, q, k, valid if padded else None)
    ref, _ = masked_dense_reference(q, k, v, mask)
    rows = mask.any(-1)
    assert_close(res.out[rows], ref[rows])
    assert res.cells == int(mask.sum())


def test_sliding_window_is_respected():
    q, k, v = qkv(T=256, D=8, seed=6)
    m = make("routing", block_size=16, num_clusters=4, cluster_keys=40, local_blocks=1)
    res = m.prefill(q, k, v, ctx_for(q, None, 50))
    mask = naive_routing_mask(m, q, k, None)
    pos = torch.arange(256)
    mask &= pos[:, None] - pos[None, :] < 50
    ref, _ = masked_dense_reference(q, k, v, mask)
    assert_close(res.out, ref)
    assert res.cells == int(mask.sum())


def test_planted_far_key_reaches_its_query():
    """A late query and one early key share a direction: the key lands in the query's cluster."""
    q, k, v = qkv(H=1, T=1024, D=32, seed=7)
    g = torch.Generator().manual_seed(8)
    centers = F.normalize(torch.randn(8, 32, generator=g), dim=-1) * 6
    lab = torch.randint(0, 8, (1024,), generator=g)
    k[0, 0] = centers[lab] + 0.3 * k[0, 0]  # keys and queries drawn around 8 directions
    q[0, 0] = centers[torch.randint(0, 8, (1024,), generator=g)] + 0.3 * q[0, 0]
    u = F.normalize(torch.randn(32, generator=g), dim=-1)
    k[0, 0, 100] = u * 6  # a key in an otherwise empty direction, early in the sequence
    q[0, 0, 1000] = u * 6
    m = make("routing", num_clusters=9, cluster_keys=8)
    mask = naive_routing_mask(m, q, k, None)
    assert bool(mask[0, 0, 1000, 100])
    res = m.prefill(q, k, v, LayerContext(0, 1.0))
    assert_close(res.out[0, 0, 1000], v[0, 0, 100], atol=1e-3, rtol=1e-3)  # attention mass on the planted key


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_lands_near_target(density):
    q, k, v = qkv(T=4096, D=32, seed=9)
    q = q[:, :, :1] + 0.5 * q
    res = make("routing", density=density).prefill(q, k, v, LayerContext(0, 32**-0.5))
    measured = res.cells / (4 * exact_cells(4096, 4096))
    assert 0.8 * density <= measured <= 1.2 * density + 0.02, measured


@pytest.mark.parametrize("key,value", [("num_clusters", 0), ("cluster_keys", -1), ("local_blocks", 0),
                                       ("chunk_size", 100), ("kmeans_iters", 0), ("density", 0.0)])
def test_bad_parameters_raise(key, value):
    with pytest.raises(ValueError, match=key):
        make("routing", **{key: value})

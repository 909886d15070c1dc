"""squeezed and centroid: the chunked k-means index, the execution against a loop reference, selection rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnsieve.kernels import dense_attention, exact_cells
from attnsieve.methods import LayerContext, make
from attnsieve.methods._clusters import ClusterMethod, build_index, spherical_kmeans
from attnsieve.methods.squeezed import calibrated_threshold, keep_top_fraction
from attnsieve.methods.window import first_real_positions

from helpers import assert_close


def qkv(B=1, H=4, Hkv=1, T=200, D=16, seed=0, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g) * sharp
    return q, torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)


def run(method, q, k, v, window=None, key_valid=None):
    return method.prefill(q, k, v, LayerContext(0, q.shape[-1] ** -0.5, window, key_valid))


# ---------------------------------------------------------------- the index


def test_spherical_kmeans_equals_a_loop_of_lloyd_steps():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 8, generator=g)
    valid = torch.rand(3, 40, generator=g) < 0.8
    valid[2] = False  # an item with no keys
    labels = spherical_kmeans(x, valid, 5, iters=6)
    for m in range(3):
        idx = torch.nonzero(valid[m]).squeeze(-1)
        if idx.numel() == 0:
            assert (labels[m] == -1).all()
            continue
        pts = F.normalize(x[m, idx], dim=-1)
        n = idx.numel()
        cent = torch.stack([pts[int((i + 0.5) * n / 5)] for i in range(5)])
        for _ in range(6):
            lab = (pts @ cent.T).argmax(-1)
            for c in range(5):
                if (lab == c).any():
                    cent[c] = F.normalize(pts[lab == c].sum(0), dim=-1)
        lab = (pts @ cent.T).argmax(-1)
        assert labels[m, idx].tolist() == lab.tolist()
        assert (labels[m][~valid[m]] == -1).all()


def test_index_groups_every_clusterable_key_once_with_its_statistics():
    q, k, v = qkv(B=2, Hkv=2, H=4, T=150, seed=2)
    ok = torch.ones(2, 150, dtype=torch.bool)
    ok[1, :30] = False
    ok[0, :4] = False  # sinks are not clustered
    index = build_index(k, v, ok, chunk=48, per_chunk=4, iters=5)
    assert index.n_chunks == 4 and index.group_keys.shape[:2] == (4, 16)
    for n in range(4):
        b = n // 2
        members = index.group_keys[n][index.group_keys[n] >= 0].tolist()
        assert sorted(members) == torch.nonzero(ok[b]).squeeze(-1).tolist()
        for c in range(16):
            keys = index.group_keys[n, c][index.group_keys[n, c] >= 0]
            assert int(index.count[n, c]) == keys.numel()
            if keys.numel():
                assert (keys // 48 == c // 4).all()  # a cluster stays inside its chunk
                assert_close(index.centroid[n, c], k[b, n % 2, keys].mean(0))
                assert_close(index.value_mean[n, c], v[b, n % 2, keys].mean(0))
                assert int(index.min_pos[n, c]) == int(keys.min()) and int(index.max_pos[n, c]) == int(keys.max())


# ---------------------------------------------------------------- execution of a selection


class EvenOdd(ClusterMethod):
    """Test double: retrieve even cluster ids, estimate odd ones (known, data-independent)."""

    class P:
        sink, kmeans_iters, density = 3, 4, None

    def __init__(self, chunk=48, per_chunk=3):
        super().__init__(self.P())
        self.chunk, self.per_chunk = chunk, per_chunk

    def chunk_and_clusters(self, Tk):
        return self.chunk, self.per_chunk

    def select(self, scores, count, vis_ret, vis_est, frac, calib):
        even = (torch.arange(scores.shape[-1]) % 2 == 0).expand_as(scores)
        return even, ~even


def evenodd_reference(method, q, k, v, window=None, key_valid=None):
    """Exact keys (own chunk, earlier sinks, even clusters) plus odd clusters' centroid terms."""
    B, H, T, D = q.shape
    Hkv, G, scale = k.shape[1], H // k.shape[1], D**-0.5
    c, K = method.chunk, method.per_chunk
    real = torch.ones(B, T, dtype=torch.bool) if key_valid is None else key_valid
    sinks = first_real_positions(key_valid, B, T, method.params.sink, "cpu")
    ok = real.clone()
    for b in range(B):
        for p in sinks[b].tolist():
            if p >= 0:
                ok[b, p] = False
    index = build_index(k, v, ok, c, K, method.params.kmeans_iters)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            n = b * Hkv + h // G
            for t in range(T):
                if not real[b, t]:
                    continue
                lo = 0 if window is None else t - window + 1
                exact = [j for j in range((t // c) * c, t + 1) if real[b, j] and j >= lo]
                exact += [p for p in sinks[b].tolist() if 0 <= p < (t // c) * c and p >= lo]
                terms, values = [], []
                for cl in range(0, (t // c) * K):
                    keys = index.group_keys[n, cl]
                    keys = keys[keys >= 0]
                    if keys.numel() == 0:
                        continue
                    if cl % 2 == 0:
                        exact += [j for j in keys.tolist() if j >= lo]
                    elif int(keys.min()) >= lo:
                        s_c = float(q[b, h, t].double() @ index.centroid[n, cl].double()) * scale
                        terms.append(s_c + torch.log(index.count[n, cl].double()))
                        values.append(index.value_mean[n, cl].double())
                kk = k[b, h // G, exact].double()
                terms = torch.cat([(kk @ q[b, h, t].double()) * scale, torch.stack(terms) if terms else
                                   torch.zeros(0, dtype=torch.float64)])
                vals = torch.cat([v[b, h // G, exact].double()] + [x[None] for x in values])
                out[b, h, t] = torch.softmax(terms, 0) @ vals
    return out.float()


@pytest.mark.parametrize(
    "heads,window,padded", [((4, 1), None, False), ((4, 2), None, True), ((2, 2), 60, False)],
    ids=["GQA", "GQA-padded", "MHA-sliding60"],
)
def test_cluster_execution_equals_its_loop_reference(heads, window, padded):
    q, k, v = qkv(B=2 if padded else 1, H=heads[0], Hkv=heads[1], T=150, seed=3)
    key_valid = None
    if padded:
        key_valid = torch.ones(2, 150, dtype=torch.bool)
        key_valid[1, :20] = False
    method = EvenOdd()
    res = run(method, q, k, v, window=window, key_valid=key_valid)
    ref = evenodd_reference(method, q, k, v, window=window, key_valid=key_valid)
    assert_close(res.out[0], ref[0], atol=1e-5, rtol=1e-4)
    assert_close(res.out[-1, :, 20 if padded else 0 :], ref[-1, :, 20 if padded else 0 :], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- selection rules


def test_keep_top_fraction_takes_the_best_clusters_until_the_share():
    logp = torch.tensor([0.0, 3.0, 1.0, 2.0]).view(1, 1, 1, 4)
    count = torch.tensor([[10.0, 10.0, 10.0, 10.0]])
    visible = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    keep = keep_top_fraction(logp, count, visible, torch.tensor(0.4).view(1, 1, 1, 1))
    assert keep.flatten().tolist() == [False, True, False, True]  # 20 keys < 16 needed at the second


def test_calibrated_threshold_keeps_the_share_on_the_observation_queries():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(1, 2, 30, 12, generator=g) * 2
    count = torch.randint(1, 9, (1, 12), generator=g).float()
    rows = torch.ones(1, 30, dtype=torch.bool)
    tau = calibrated_threshold(scores, rows, count, torch.tensor([0.25]))
    p = torch.softmax(scores + torch.log(count), -1) / count  # per-key estimates
    kept = ((p >= tau) * count).sum() / (count.sum() * 60)
    assert 0.25 <= float(kept) <= 0.25 + float(count.max()) / float(count.sum())


def test_centroid_zones_follow_the_paper_fractions():
    method = make("centroid")
    scores = torch.arange(100.0).view(1, 1, 1, 100)  # cluster 99 is best
    count = torch.full((1, 100), 16.0)
    vis = torch.ones(1, 1, 1, 100, dtype=torch.bool)
    ret, est = method.select(scores, count, vis, vis, None, None)
    assert torch.nonzero(ret.flatten()).flatten().tolist() == [99]  # max(1, floor(1.8))
    assert torch.nonzero(est.flatten()).flatten().tolist() == list(range(76, 99))  # floor(23.2) next


# ---------------------------------------------------------------- behaviour


@pytest.mark.parametrize("name", ["squeezed", "centroid"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_knob_lands_near_target(name, density):
    q, k, v = qkv(T=2048, D=32, seed=6)
    q = q[:, :, :1] + 0.5 * q  # neighbouring queries are correlated, as in real models
    res = run(make(name, density=density), q, k, v)
    measured = res.cells / (4 * exact_cells(2048, 2048))
    assert 0.7 * density <= measured <= 1.3 * density, measured


@pytest.mark.parametrize("name", ["squeezed", "centroid"])
def test_a_planted_distant_key_is_retrieved(name):
    q, k, v = qkv(H=1, T=1024, D=32, seed=7)
    k[0, 0, 100] = q[0, 0, -1] * 3
    v[0, 0, 100] = 30.0
    res = run(make(name, density=0.1), q, k, v)
    ref, _ = dense_attention(q, k, v)
    assert_close(res.out[0, 0, -1], ref[0, 0, -1], atol=0.3, rtol=0.05)


def test_centroid_estimation_zone_reduces_the_error():
    q, k, v = qkv(T=1024, D=32, seed=8, sharp=0.5)
    v = v + 1.0  # a shared value direction that dropped clusters would lose
    ref, _ = dense_attention(q, k, v)
    errs = [float((run(make("centroid", estimation_frac=f), q, k, v).out - ref).norm() / ref.norm())
            for f in (0.0, 0.232, 1.0)]
    assert errs[0] > errs[1] > errs[2], errs


@pytest.mark.parametrize("name,params", [("centroid", {}), ("squeezed", {"observation_window": 0})])
def test_chunked_queries_match_the_full_call(name, params):
    """Queries at the end of the keys (Tq < Tk) get the outputs the full call gives them."""
    q, k, v = qkv(T=300, seed=9)
    method = make(name, chunk_size=64, **params)
    full = run(method, q, k, v)
    part = run(method, q[:, :, -100:], k, v)
    assert_close(part.out, full.out[:, :, -100:])

"""Feature-map and low-rank methods (performer, linear, nystrom) and their kernels, against slow references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnsieve.kernels import dense_attention
from attnsieve.kernels.feature_maps import (
    FEATURE_MAPS,
    favor_features,
    orthogonal_gaussian,
)
from attnsieve.kernels.linear_attention import causal_feature_attention
from attnsieve.kernels.nystrom import iterative_pinv, nystrom_attention, segment_means
from attnsieve.methods import LayerContext, make, parse_params
from attnsieve.methods.performer import default_features, favor_qk

from helpers import assert_close

F64 = dict(atol=1e-10, rtol=1e-10)


def qkv(B=1, H=4, Hkv=1, T=200, D=16, seed=0, dtype=torch.float32, Tq=None, amp=1.0):
    g = torch.Generator().manual_seed(seed)
    Tq = T if Tq is None else Tq
    return (torch.randn(B, H, Tq, D, generator=g, dtype=dtype) * amp,
            torch.randn(B, Hkv, T, D, generator=g, dtype=dtype) * amp,
            torch.randn(B, Hkv, T, D, generator=g, dtype=dtype))


def ctx_for(q, window=None, key_valid=None, causal=True, layer=0):
    return LayerContext(layer, q.shape[-1] ** -0.5, window, key_valid, causal)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------- slow references


def quadratic_reference(fq, lq, fk, lk, v, *, window=None, key_valid=None, skip_chunk=None):
    """Explicit [Tq, Tk] feature matrix in log space (fp64), masked, row-normalised. Tests only."""
    B, H, Tq, _ = fq.shape
    Hkv, Tk = fk.shape[1], fk.shape[2]
    G = H // Hkv
    fk, v = fk.repeat_interleave(G, 1).double(), v.repeat_interleave(G, 1).double()
    lk = lk.repeat_interleave(H // lk.shape[1], 1).double()
    log_a = torch.log(fq.double() @ fk.transpose(-1, -2)) + lq.double()[..., None] + lk[..., None, :]
    qp, kp = torch.arange(Tk - Tq, Tk)[:, None], torch.arange(Tk)[None, :]
    m = kp <= qp
    if window is not None:
        m = m & (qp - kp < window)
    if skip_chunk is not None:
        m = m & (kp // skip_chunk != qp // skip_chunk)
    m = m[None, None]
    if key_valid is not None:
        m = m & key_valid[:, None, None, :]
    log_a = log_a.masked_fill(~m, -math.inf)
    lse = torch.logsumexp(log_a, -1)
    p = torch.exp(log_a - torch.where(torch.isfinite(lse), lse, 0)[..., None])
    return p @ v, lse


def recurrent_reference(phi_q, phi_k, v, gammas=None):
    """Token-by-token linear attention: S_t = gamma S_{t-1} + phi(k_t) v_t^T (fp64, Tq = Tk). Tests only."""
    B, H, T, M = phi_q.shape
    G = H // phi_k.shape[1]
    phi_k, v = phi_k.repeat_interleave(G, 1).double(), v.repeat_interleave(G, 1).double()
    g = torch.ones(H, dtype=torch.float64) if gammas is None else gammas
    S = torch.zeros(B, H, M, v.shape[-1], dtype=torch.float64)
    z = torch.zeros(B, H, M, dtype=torch.float64)
    out = torch.empty(B, H, T, v.shape[-1], dtype=torch.float64)
    for t in range(T):
        S = g[None, :, None, None] * S + phi_k[:, :, t, :, None] * v[:, :, t, None, :]
        z = g[None, :, None] * z + phi_k[:, :, t]
        qt = phi_q[:, :, t].double()
        out[:, :, t] = (qt[:, :, None, :] @ S)[:, :, 0] / (qt * z).sum(-1, keepdim=True)
    return out


# ---------------------------------------------------------------- feature maps


def test_orthogonal_projection_blocks_are_orthogonal_and_deterministic():
    w = orthogonal_gaussian(40, 16, seed=3, dtype=torch.float64)
    assert torch.equal(w, orthogonal_gaussian(40, 16, seed=3, dtype=torch.float64))
    assert not torch.equal(w, orthogonal_gaussian(40, 16, seed=4, dtype=torch.float64))
    u = w / w.norm(dim=-1, keepdim=True)
    for blk in (u[:16], u[16:32], u[32:]):
        assert_close(blk @ blk.T, torch.eye(blk.shape[0], dtype=torch.float64), **F64)


@pytest.mark.parametrize("hyperbolic", [False, True], ids=["positive", "hyperbolic"])
def test_favor_is_unbiased(hyperbolic):
    """Averaged over many independent orthogonal blocks, phi(q) . phi(k) converges to exp(q . k * scale)."""
    D, scale, n_blocks = 8, 8**-0.5, 4000  # inputs small enough that the estimate's variance is moderate
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, D, generator=g, dtype=torch.float64) * 0.4
    y = torch.randn(5, D, generator=g, dtype=torch.float64) * 0.4
    exact = torch.exp(x @ y.T * scale)
    w = orthogonal_gaussian(n_blocks * D, D, seed=123, dtype=torch.float64)  # n_blocks independent blocks
    fx, lx = favor_features(x, w, scale, hyperbolic=hyperbolic)
    fy, ly = favor_features(y, w, scale, hyperbolic=hyperbolic)
    M = fx.shape[-1]
    # one unbiased sample per feature: M * phi_f(x) phi_f(y); averaged per block (blocks are independent)
    samples = M * fx[:, None, :] * fy[None, :, :] * torch.exp(lx[:, None] + ly[None, :])[..., None]
    per_block = samples.view(6, 5, M // (n_blocks * D), n_blocks, D).mean((2, 4))
    est, se = per_block.mean(-1), per_block.std(-1) / n_blocks**0.5
    assert bool(((est - exact).abs() < 4 * se).all()), ((est - exact) / se).abs().max()
    assert float(((est - exact) / exact).abs().max()) < 0.03


def test_favor_shift_is_per_row():
    """A key's features and shift depend on that key alone (no global maximum across keys)."""
    w = orthogonal_gaussian(32, 8, seed=0)
    k = torch.randn(1, 1, 20, 8)
    f, l = favor_features(k, w, 0.3)
    k2 = k.clone()
    k2[..., 10:, :] *= 5
    f2, l2 = favor_features(k2, w, 0.3)
    assert torch.equal(f[..., :10, :], f2[..., :10, :]) and torch.equal(l[..., :10], l2[..., :10])
    assert float(f.amax(-1).min()) == 1.0  # each row's largest feature is 1, its scale in the shift


def test_feature_maps_are_nonnegative():
    x = torch.randn(3, 7, 16)
    for name, fmap in FEATURE_MAPS.items():
        f, l = fmap(x)
        assert bool((f >= 0).all()) and torch.equal(l, torch.zeros(3, 7)), name
    f, _ = FEATURE_MAPS["hedgehog"](x)
    assert f.shape[-1] == 32
    assert_close(f.sum(-1), torch.full((3, 7), 2.0))


# ---------------------------------------------------------------- chunked feature-map kernel


def random_features(B, H, Hkv, Tq, Tk, M=8, Dv=6, seed=0, shift_scale=5.0, per_head_keys=False):
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    fq, fk = torch.rand(B, H, Tq, M, generator=g, dtype=d), torch.rand(B, Hkv, Tk, M, generator=g, dtype=d)
    lq = torch.randn(B, H, Tq, generator=g, dtype=d) * shift_scale
    lk = torch.randn(B, H if per_head_keys else Hkv, Tk, generator=g, dtype=d) * shift_scale
    return fq, lq, fk, lk, torch.randn(B, Hkv, Tk, Dv, generator=g, dtype=d)


CASES = [  # B, H, Hkv, Tq, Tk, chunk, window, padded, per-head key shifts, skip own chunk
    (1, 4, 1, 1, 1, 16, None, False, False, False),
    (1, 4, 1, 50, 50, 16, None, False, False, False),
    (2, 4, 2, 37, 80, 16, None, True, False, False),
    (1, 2, 1, 100, 100, 16, 23, False, False, False),
    (1, 2, 2, 100, 100, 7, 40, True, True, False),
    (1, 4, 1, 64, 64, 16, 64, False, True, False),
    (2, 4, 1, 90, 90, 16, None, True, False, True),
    (1, 2, 1, 90, 130, 16, 35, True, False, True),
    (1, 3, 3, 70, 70, 1, 10, False, False, False),
    (1, 2, 1, 33, 33, 64, 5, False, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}Tq{c[3]}Tk{c[4]}C{c[5]}w{c[6]}")
def test_chunked_kernel_equals_quadratic_reference(case):
    B, H, Hkv, Tq, Tk, C, window, padded, per_head, skip = case
    fq, lq, fk, lk, v = random_features(B, H, Hkv, Tq, Tk, per_head_keys=per_head, seed=Tk + C)
    valid = None
    if padded:
        valid = torch.ones(B, Tk, dtype=torch.bool)
        valid[0, :13] = False
    res = causal_feature_attention(fq, lq, fk, lk, v, window=window, key_valid=valid, chunk=C, skip_own_chunk=skip)
    ref, ref_lse = quadratic_reference(
        fq, lq, fk, lk, v, window=window, key_valid=valid, skip_chunk=C if skip else None
    )
    rows = torch.isfinite(ref_lse)
    if valid is not None:
        rows &= valid[:, None, Tk - Tq :]
    assert_close(res.out[rows], ref[rows], **F64)
    assert_close(res.lse[rows], ref_lse[rows], **F64)
    assert bool((res.lse[~torch.isfinite(ref_lse)] == -math.inf).all())  # nothing seen: empty, not NaN
    assert bool(torch.isfinite(res.out).all())


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    Tk=st.integers(1, 90),
    q_frac=st.sampled_from([1.0, 0.5, 0.1]),
    chunk=st.sampled_from([1, 5, 16, 64]),
    window=st.sampled_from([None, 1, 7, 30]),
    per_head=st.booleans(),
    skip=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_chunked_kernel_property(heads, Tk, q_frac, chunk, window, per_head, skip, seed):
    H, Hkv = heads
    Tq = max(1, int(Tk * q_frac))
    fq, lq, fk, lk, v = random_features(1, H, Hkv, Tq, Tk, per_head_keys=per_head, seed=seed)
    res = causal_feature_attention(fq, lq, fk, lk, v, window=window, chunk=chunk, skip_own_chunk=skip)
    ref, ref_lse = quadratic_reference(fq, lq, fk, lk, v, window=window, skip_chunk=chunk if skip else None)
    rows = torch.isfinite(ref_lse)
    assert_close(res.out[rows], ref[rows], **F64)
    assert_close(res.lse[rows], ref_lse[rows], **F64)
    assert bool((res.lse[~rows] == -math.inf).all()) and bool((res.out[~rows] == 0).all())


def test_chunked_kernel_survives_extreme_shifts():
    """Log shifts spanning +-2000 neither overflow nor underflow (fp32, compared in fp64 log space)."""
    fq, lq, fk, lk, v = random_features(1, 2, 1, 80, 80, shift_scale=700.0, seed=5)
    res = causal_feature_attention(fq.float(), lq.float(), fk.float(), lk.float(), v.float(), chunk=16)
    ref, ref_lse = quadratic_reference(fq, lq, fk, lk, v)
    assert bool(torch.isfinite(res.out).all())
    assert_close(res.out, ref.float(), atol=1e-4, rtol=1e-4)
    assert_close(res.lse, ref_lse.float(), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("fmap", sorted(FEATURE_MAPS))
@pytest.mark.parametrize("decay", ["none", "retnet", "constant"])
@pytest.mark.parametrize("chunk", [1, 16, 64])
def test_linear_chunked_equals_recurrent(fmap, decay, chunk):
    """The method's chunked form equals the token-by-token recurrence (with decay)."""
    q, k, v = qkv(H=4, Hkv=2, T=150, D=8, seed=1, dtype=torch.float64)
    res = make("linear", feature_map=fmap, decay=decay, gamma=0.9, chunk=chunk).prefill(q, k, v, ctx_for(q))
    phi_q, phi_k = FEATURE_MAPS[fmap](q)[0], FEATURE_MAPS[fmap](k)[0]
    gammas = {"none": None, "retnet": 1 - 2.0 ** (-5.0 - torch.arange(4.0, dtype=torch.float64)),
              "constant": torch.full((4,), 0.9, dtype=torch.float64)}[decay]
    ref = recurrent_reference(phi_q, phi_k, v, gammas)
    empty = torch.isnan(ref)  # relu: a query orthogonal to every key has a zero normaliser
    assert fmap == "relu" or not bool(empty.any())
    assert bool((res.out[empty] == 0).all())
    assert_close(res.out[~empty], ref[~empty], **F64)


def test_linear_cells_count_the_chunk_triangles():
    q, k, v = qkv(T=100, seed=2)
    res = make("linear", chunk=16).prefill(q, k, v, ctx_for(q))
    # six full chunks of 16 (16 * 17 / 2 cells each) and one of 4 (10 cells), per query head
    assert res.cells == 4 * (6 * 136 + 10)


# ---------------------------------------------------------------- performer


def test_performer_matches_its_feature_matrix():
    """The method is row-normalised (phi(q) . phi(k)) @ V over causal keys, with its own features."""
    q, k, v = qkv(H=4, Hkv=2, T=120, seed=3, dtype=torch.float64)
    method = make("performer", nb_features=40, chunk=16, seed=7)
    ctx = ctx_for(q, layer=2)
    res = method.prefill(q, k, v, ctx)
    fq, lq, fk, lk = favor_qk(q, k, ctx.scale, 40, 7, 2, False)
    ref, ref_lse = quadratic_reference(fq, lq, fk, lk, v)
    assert_close(res.out, ref, **F64)
    assert_close(res.lse, ref_lse, **F64)


@pytest.mark.parametrize("hyperbolic", [False, True], ids=["positive", "hyperbolic"])
def test_performer_error_falls_as_features_grow(hyperbolic):
    q, k, v = qkv(T=256, D=16, seed=4, amp=0.6)
    ref, _ = dense_attention(q, k, v)
    errs = []
    for m in (16, 128, 1024):
        runs = [make("performer", nb_features=m, seed=s, hyperbolic=hyperbolic).prefill(q, k, v, ctx_for(q)).out
                for s in range(3)]
        errs.append(sum(rel_err(o, ref) for o in runs) / 3)
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.5 * errs[0], errs


def test_performer_default_features_and_determinism():
    assert default_features(64) == round(64 * math.log(64))
    q, k, v = qkv(T=70, seed=5)
    a = make("performer").prefill(q, k, v, ctx_for(q, layer=1)).out
    b = make("performer").prefill(q, k, v, ctx_for(q, layer=1)).out
    c = make("performer").prefill(q, k, v, ctx_for(q, layer=2)).out
    assert torch.equal(a, b) and not torch.equal(a, c)  # fixed per (seed, layer), not redrawn


@pytest.mark.parametrize("name", ["performer", "linear"])
def test_sliding_window_never_sees_older_keys(name):
    """On a sliding layer, keys older than the window never change an output."""
    q, k, v = qkv(T=200, seed=6)
    method = make(name, chunk=16)
    base = method.prefill(q, k, v, ctx_for(q, window=30))
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :100] = torch.randn_like(k2[:, :, :100]) * 3
    v2[:, :, :100] = torch.randn_like(v2[:, :, :100])
    out = method.prefill(q, k2, v2, ctx_for(q, window=30)).out
    assert_close(out[:, :, 129:], base.out[:, :, 129:])  # queries >= 129 see keys >= 100 only
    assert not torch.allclose(out[:, :, 100:129], base.out[:, :, 100:129])


@pytest.mark.parametrize("name", ["performer", "linear"])
def test_left_padding_is_never_seen(name):
    q, k, v = qkv(B=1, T=150, seed=7)
    method = make(name, chunk=16)
    alone = method.prefill(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], ctx_for(q)).out
    valid = torch.ones(1, 150, dtype=torch.bool)
    valid[0, :20] = False
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :20], v2[:, :, :20] = float("nan"), float("nan")  # padding content must not leak in
    padded = method.prefill(q, k2, v2, ctx_for(q, key_valid=valid)).out
    if name == "linear":  # position-free map: the padded row equals its unpadded run
        assert_close(padded[:, :, 20:], alone)
    assert bool(torch.isfinite(padded).all())


@pytest.mark.parametrize("name", ["performer", "linear", "scatterbrain"])
def test_bf16_inputs_run_in_fp32_and_keep_their_dtype(name):
    q, k, v = qkv(T=100, seed=12)
    params = {"chunk": 16} if name != "scatterbrain" else {"density": 0.3, "block_size": 16}
    method = make(name, **params)
    ref = method.prefill(q, k, v, ctx_for(q)).out
    out = method.prefill(q.bfloat16(), k.bfloat16(), v.bfloat16(), ctx_for(q)).out
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 0.05


# ---------------------------------------------------------------- nystrom


def test_segment_means_use_real_tokens_only():
    x = torch.arange(10.0).view(1, 1, 10, 1)
    valid = torch.tensor([[False, False, True, True, True, True, True, True, True, True]])
    means, counts = segment_means(x, valid, 4)
    assert counts.tolist() == [[2, 2, 2, 2]]
    assert means.view(-1).tolist() == [2.5, 4.5, 6.5, 8.5]
    means, counts = segment_means(x, valid, 12)  # more segments than tokens: one token each
    assert int((counts > 0).sum()) == 8 and sorted(means[0, 0, counts[0] > 0, 0].tolist()) == list(range(2, 10))


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(3, 12, 12, generator=g, dtype=torch.float64), -1)
    assert_close(iterative_pinv(a, 40), torch.linalg.pinv(a), atol=1e-8, rtol=1e-8)
    rect = torch.softmax(torch.randn(5, 9, generator=g, dtype=torch.float64), -1)
    assert_close(iterative_pinv(rect, 40), torch.linalg.pinv(rect), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("heads", [(4, 1), (2, 2)], ids=["GQA", "MHA"])
@pytest.mark.parametrize("Tq", [60, 17], ids=["self", "fixed-prefix"])
def test_nystrom_is_exact_with_a_landmark_per_token(heads, Tq):
    """Landmarks = tokens: F A+ B = P P+ P = P (up to the pseudo-inverse iteration)."""
    q, k, v = qkv(H=heads[0], Hkv=heads[1], T=60, Tq=Tq, seed=8, dtype=torch.float64, amp=0.5)
    res = make("nystrom", num_landmarks=64, pinv_iterations=60).prefill(q, k, v, ctx_for(q, causal=False))
    ref, ref_lse = dense_attention(q, k, v, causal=False)
    assert_close(res.out, ref, atol=1e-8, rtol=1e-8)
    assert_close(res.lse, ref_lse, atol=1e-8, rtol=1e-8)  # landmarks = tokens: the exact normaliser
    assert res.cells == 0


def test_nystrom_error_falls_as_landmarks_grow():
    q, k, v = qkv(T=256, D=16, seed=9, amp=0.5)
    ref, _ = dense_attention(q, k, v, causal=False)
    errs = [rel_err(make("nystrom", num_landmarks=n).prefill(q, k, v, ctx_for(q, causal=False)).out, ref)
            for n in (4, 16, 64, 256)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), errs


def test_nystrom_left_padding_equals_the_unpadded_row():
    q, k, v = qkv(B=2, T=120, seed=10, amp=0.5)
    valid = torch.ones(2, 120, dtype=torch.bool)
    valid[0, :30] = False
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :30], v2[0, :, :30] = 1e4, float("nan")  # padding content never reaches a real output
    method = make("nystrom", num_landmarks=16)
    padded = method.prefill(q, k2, v2, ctx_for(q, key_valid=valid, causal=False)).out
    alone = method.prefill(q[:1, :, 30:], k[:1, :, 30:], v[:1, :, 30:], ctx_for(q, causal=False)).out
    other = method.prefill(q[1:], k[1:], v[1:], ctx_for(q, causal=False)).out
    assert_close(padded[0, :, 30:], alone[0], atol=1e-5, rtol=1e-5)
    assert_close(padded[1], other[0], atol=1e-5, rtol=1e-5)  # batch rows independent


def test_nystrom_kernel_fixed_prefix_with_padding_is_exact_with_token_landmarks():
    q, k, v = qkv(B=2, T=50, Tq=20, seed=11, dtype=torch.float64, amp=0.5)
    valid = torch.ones(2, 50, dtype=torch.bool)
    valid[1, :12] = False
    out, _ = nystrom_attention(q, k, v, num_landmarks=64, iterations=60, key_valid=valid)
    ref, _ = dense_attention(q, k, v, causal=False, key_valid=valid)
    assert_close(out, ref, atol=1e-8, rtol=1e-8)


def test_nystrom_refuses_causal_and_sliding_layers():
    q, k, v = qkv(T=20)
    with pytest.raises(ValueError, match="non-causal"):
        make("nystrom").prefill(q, k, v, ctx_for(q))
    with pytest.raises(ValueError, match="window"):
        make("nystrom").prefill(q, k, v, LayerContext(0, 0.25, 8, None, causal=False))


@pytest.mark.parametrize(
    "name,key,value",
    [("performer", "nb_features", "0"), ("performer", "chunk", "0"), ("performer", "seed", "-1"),
     ("linear", "chunk", "5000"), ("linear", "gamma", "1.5"), ("linear", "feature_map", "tanh"),
     ("linear", "decay", "alibi"), ("nystrom", "num_landmarks", "0"), ("nystrom", "pinv_iterations", "0")],
)
def test_bad_parameters_name_the_value(name, key, value):
    with pytest.raises(ValueError, match=key):
        make(name, **parse_params(name, {key: value}))

"""BLASST: the skip-softmax kernel against a plain-loop reference of its rule, and the method's knobs."""

from __future__ import annotations

import math

import pytest
import torch

import attnsieve.kernels.skip_softmax as skip_kernel
from attnsieve.kernels import dense_attention, exact_cells
from attnsieve.kernels.skip_softmax import context_lengths, skip_softmax_attention
from attnsieve.methods import LayerContext, make
from attnsieve.methods._causal_calibration import chunk_bounds, histogram_edges, keep_threshold

from helpers import assert_close


def skip_reference(q, k, v, log_thr, bs, window=None, key_valid=None, shift=None):
    """Each query row visits its key blocks in order and skips one when max - running max < ln lambda.

    Returns (out, skipped cells, [(batch row, gap + shift, cells)] for every visited (row, block)).
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    out = torch.zeros(B, H, Tq, v.shape[-1], dtype=torch.float64)
    skipped, gaps = 0, []
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                p = Tk - Tq + i
                if key_valid is not None and not key_valid[b, p]:
                    continue
                lt = min(float(log_thr[b, i]), 0.0)
                m, l, acc = -math.inf, 0.0, torch.zeros(v.shape[-1], dtype=torch.float64)
                for j in range(p // bs + 1):
                    keys = [t for t in range(j * bs, min((j + 1) * bs, p + 1))
                            if (window is None or p - t < window) and (key_valid is None or key_valid[b, t])]
                    if not keys:
                        continue
                    s = (k[b, h // G, keys].double() @ q[b, h, i].double()) * D**-0.5
                    mb = float(s.max())
                    gaps.append((b, mb - m + (0.0 if shift is None else float(shift[b, i])), len(keys)))
                    if mb - m < lt:
                        skipped += len(keys)
                        continue
                    m_new = max(m, mb)
                    alpha = math.exp(m - m_new)
                    e = torch.exp(s - m_new)
                    l = l * alpha + float(e.sum())
                    acc = acc * alpha + e @ v[b, h // G, keys].double()
                    m = m_new
                out[b, h, i] = acc / l
    return out.to(q.dtype), skipped, gaps


def qkv(B, H, Hkv, Tq, Tk, D=16, seed=0, q_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Tq, D, generator=g) * q_scale, torch.randn(B, Hkv, Tk, D, generator=g),
            torch.randn(B, Hkv, Tk, D, generator=g))


CASES = {  # B, H, Hkv, Tq, Tk, window, left padding of batch row 0
    "mha": (1, 4, 4, 100, 100, None, 0),
    "gqa-win40": (2, 4, 2, 63, 63, 40, 0),
    "chunk-tq<tk": (2, 4, 1, 20, 90, None, 0),
    "pad37": (2, 4, 1, 130, 130, None, 37),
    "pad-win25-tq<tk": (2, 2, 1, 70, 100, 25, 10),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("compact", [0.0, 1.01], ids=["dense-pass", "gather-tiles"])
def test_kernel_equals_plain_loop_reference(case, compact, monkeypatch):
    B, H, Hkv, Tq, Tk, window, pad = CASES[case]
    monkeypatch.setattr(skip_kernel, "COMPACT_BELOW", compact)
    q, k, v = qkv(B, H, Hkv, Tq, Tk, seed=Tq)
    valid = None
    if pad:
        valid = torch.ones(B, Tk, dtype=torch.bool)
        valid[0, :pad] = False
    g = torch.Generator().manual_seed(1)
    log_thr = -1.5 + torch.rand(B, Tq, generator=g)  # per-row thresholds, some skipping
    shift = torch.rand(B, Tq, generator=g) * 3
    res = skip_softmax_attention(q, k, v, log_threshold=log_thr, window=window, key_valid=valid, block_size=16,
                                 hist_bins=(-5.0, 0.05, 201), gap_shift=shift)
    ref, skipped, gaps = skip_reference(q, k, v, log_thr, 16, window=window, key_valid=valid, shift=shift)
    real = torch.ones(B, Tq, dtype=torch.bool) if valid is None else valid[:, Tk - Tq:]
    rows = real[:, None, :, None].expand_as(ref)
    assert_close(res.out[rows], ref[rows], what=case)
    assert skipped > 0 and res.skipped_cells == skipped
    assert res.cells == H * exact_cells(Tq, Tk, window=window, key_valid=valid if valid is not None
                                        else torch.ones(B, Tk, dtype=torch.bool))
    hist = torch.zeros(B, 202, dtype=torch.float64)
    edges = histogram_edges(-5.0, 5.0, 0.05)
    for b, gap, cells in gaps:
        hist[b, torch.bucketize(torch.tensor(gap, dtype=torch.float64), edges)] += cells
    torch.testing.assert_close(res.gap_hist, hist)


@pytest.mark.parametrize("T", [1, 63, 300])
@pytest.mark.parametrize("window", [None, 40], ids=["global", "sliding40"])
@pytest.mark.parametrize("heads", [(4, 1), (4, 4)], ids=["GQA", "MHA"])
def test_kernel_never_skips_at_minus_inf_and_equals_dense(T, window, heads):
    q, k, v = qkv(1, heads[0], heads[1], T, T, D=32, seed=T)
    res = skip_softmax_attention(q, k, v, log_threshold=float("-inf"), window=window, block_size=32)
    ref, lse = dense_attention(q, k, v, window=window)
    assert_close(res.out, ref)
    assert_close(res.lse, lse)
    assert res.skipped_cells == 0
    assert res.cells == heads[0] * exact_cells(T, T, window=window)


def test_keep_threshold_matches_sorting():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(2, 500, generator=g, dtype=torch.float64) * 3
    weights = torch.rand(2, 500, generator=g, dtype=torch.float64)
    edges = histogram_edges(-10.0, 10.0, 0.01)
    hist = torch.zeros(2, edges.numel() + 1, dtype=torch.float64)
    hist.scatter_add_(1, torch.bucketize(values, edges), weights)
    keep = torch.tensor([0.3, 0.8], dtype=torch.float64)
    v = keep_threshold(hist, edges, keep)
    for b in range(2):
        kept = weights[b][values[b] > v[b]].sum() / weights[b].sum()
        assert keep[b] <= kept <= keep[b] + 0.01  # the smallest bin edge reaching the target
    everything = keep_threshold(hist, edges, torch.ones(2, dtype=torch.float64))
    assert (values > everything[:, None]).all()
    assert keep_threshold(torch.zeros_like(hist), edges, keep).isneginf().all()  # nothing seen yet


def test_chunk_bounds_cover_the_queries_on_block_boundaries():
    for Tq, Tk in [(1000, 1000), (300, 1000), (5, 5)]:
        bounds = chunk_bounds(Tq, Tk, 32, chunks=8)
        assert bounds[0][0] == 0 and bounds[-1][1] == Tq
        assert all(e == s2 for (_, e), (s2, _) in zip(bounds, bounds[1:], strict=False))
        assert all((Tk - Tq + s) % 32 == 0 for s, _ in bounds[1:])
        assert all(e - s >= 4 * 32 for s, e in bounds[1:-1])  # the first may start inside a block
        assert len(bounds) == 1 or bounds[0][1] - bounds[0][0] > 3 * 32


def structured(T=1024, seed=0, D=32, sink=4.0):
    """Queries correlated along the sequence, keys with a heavy first token: attention like a real LM."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 1, 1, D, generator=g)
    q = (base + 0.5 * torch.randn(1, 4, T, D, generator=g)) * 2.0
    k = torch.randn(1, 1, T, D, generator=g)
    k[:, :, 0] = base[0, 0] * sink  # an attention sink
    v = torch.randn(1, 1, T, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("density", [0.2, 0.4, 0.7])
def test_density_calibrates_the_non_skipped_fraction(density):
    q, k, v = structured()
    ctx = LayerContext(0, q.shape[-1] ** -0.5)
    res = make("blasst", density=density, block_size=32).prefill(q, k, v, ctx)
    kept = 1 - res.skipped_cells / res.cells
    assert res.cells == 4 * exact_cells(1024, 1024)  # every score is computed
    assert 0.7 * density <= kept <= 1.3 * density + 0.02, kept


def test_threshold_law_and_fixed_threshold():
    """lambda = a / L (L = real context), a fixed lambda overrides it, and both skip more as they grow."""
    q, k, v = structured(T=512, seed=1, sink=0.0)
    ctx = LayerContext(0, q.shape[-1] ** -0.5)
    skipped = [make("blasst", threshold_scale=a, block_size=32).prefill(q, k, v, ctx).skipped_cells
               for a in (0.0, 1.0, 50.0)]
    assert skipped[0] == 0 and skipped[0] < skipped[1] < skipped[2]
    fixed = make("blasst", threshold_scale=50.0, threshold=50.0 / 512, block_size=32).prefill(q, k, v, ctx)
    assert fixed.skipped_cells == skipped[2]
    dense = make("blasst", threshold=0.0, block_size=32).prefill(q, k, v, ctx)
    assert_close(dense.out, dense_attention(q, k, v)[0])


def test_threshold_law_counts_real_tokens_under_left_padding():
    q, k, v = structured(T=300, seed=2)
    valid = torch.ones(1, 300, dtype=torch.bool)
    valid[0, :100] = False
    ctx = LayerContext(0, q.shape[-1] ** -0.5, key_valid=valid)
    res = make("blasst", threshold_scale=20.0, block_size=32).prefill(q, k, v, ctx)
    ref = skip_softmax_attention(q, k, v, log_threshold=math.log(20.0 / 200), key_valid=valid, block_size=32)
    assert res.skipped_cells == ref.skipped_cells > 0


def test_context_lengths_follow_window_and_padding():
    valid = torch.tensor([[False, False, True, True, True, True]])
    assert context_lengths(4, 6, None, valid, 1, "cpu").tolist() == [[1, 2, 3, 4]]
    assert context_lengths(4, 6, 2, valid, 1, "cpu").tolist() == [[1, 2, 2, 2]]


@pytest.mark.parametrize(
    "key,value",
    [("threshold_scale", -1.0), ("threshold", 1.5), ("density", 0.0), ("block_size", 8), ("calib_chunks", 0)],
)
def test_bad_parameters_raise_value_error_naming_the_value(key, value):
    with pytest.raises(ValueError, match=key):
        make("blasst", **{key: value})

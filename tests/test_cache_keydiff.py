"""KeyDiff: key-dissimilarity scores against a naive loop, planted distinct keys, parameter errors."""

from __future__ import annotations

import pytest
import torch

import attnsieve
from attnsieve.cache import make_policy
from attnsieve.cache.keydiff import KeyDiffParams, keydiff_scores
from attnsieve.kernels import dense_attention

from helpers import assert_close

SCALE = 0.3


def exact(qq, kk, vv):
    out, lse = dense_attention(qq, kk, vv, causal=True, scale=SCALE)
    return attnsieve.methods.AttnOutput(out, 0, lse=lse)


def naive_keydiff(keys: torch.Tensor) -> torch.Tensor:
    """Scores of one head's keys [L, D] as kvpress `kvpress/presses/keydiff_press.py` KeyDiffPress.score:
    anchor = mean of the unit keys, score = -cosine(key, anchor); written as plain loops."""
    L, D = keys.shape
    anchor = [0.0] * D
    for i in range(L):
        norm = max(sum(float(x) ** 2 for x in keys[i]) ** 0.5, 1e-12)
        for d in range(D):
            anchor[d] += float(keys[i, d]) / norm / L
    a_norm = sum(x**2 for x in anchor) ** 0.5
    out = torch.zeros(L)
    for i in range(L):
        dot = sum(float(keys[i, d]) * anchor[d] for d in range(D))
        k_norm = sum(float(x) ** 2 for x in keys[i]) ** 0.5
        out[i] = -dot / max(k_norm * a_norm, 1e-8)
    return out


def test_scores_and_kept_tokens_equal_a_naive_loop_with_left_padding():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D, pad = 2, 4, 2, 30, 8, 5
    q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :pad] = False  # row 1 is left-padded: padding is never stored nor in the anchor
    full = make_policy("keydiff", 1.0).layer(0)
    full.attend(q, k, v, valid, SCALE, exact)
    layer = make_policy("keydiff", 0.4, kv_sink=2).layer(0)
    layer.attend(q, k, v, valid, SCALE, exact)
    scores = keydiff_scores(full)
    for r in range(B * Hkv):
        b, h = divmod(r, Hkv)
        real = k[b, h][valid[b]]
        want = naive_keydiff(real)
        assert_close(scores[r], want, atol=1e-5, rtol=1e-5)
        n = -(-2 * real.shape[0] // 5)  # ceil(0.4 * real tokens)
        forced = want.clone()
        forced[:2] = float("inf")
        kept = torch.topk(forced, n).indices.sort().values + (pad if b == 1 else 0)
        assert layer.pos[r].long().tolist() == kept.tolist()
        assert torch.equal(layer.keys[r], k[b, h, kept])  # real storage: the kept keys themselves


def test_planted_distinct_keys_are_kept_per_head_and_decoded_tokens_appended():
    T, D = 40, 8
    k = torch.zeros(1, 2, T, D)
    k[..., 0] = 1.0  # every key along one direction ...
    k[..., 1] = 0.05 * torch.randn(1, 2, T, generator=torch.Generator().manual_seed(3))
    for h, planted in enumerate(([7, 13, 22, 30], [3, 18, 25, 39])):  # ... but four per head
        for j, t in enumerate(planted):
            k[0, h, t] = 0.0
            k[0, h, t, 2 + j] = 2.0  # orthogonal to the common direction: least similar to the anchor
    q, v = torch.randn(1, 4, T + 1, D), torch.randn(1, 2, T + 1, D)
    layer = make_policy("keydiff", 0.125, kv_sink=1).layer(0)  # ceil(0.125 * 40) = 5 = sink + 4
    layer.attend(q[:, :, :T], k, v[:, :, :T], None, SCALE, exact)
    assert layer.pos[0].tolist() == [0, 7, 13, 22, 30]
    assert layer.pos[1].tolist() == [0, 3, 18, 25, 39]
    k_new = torch.randn(1, 2, 1, D)
    layer.attend(q[:, :, T:], k_new, v[:, :, T:], None, SCALE, exact)  # a decoded token is stored, not scored
    assert layer.pos[0].tolist() == [0, 7, 13, 22, 30, 40]
    assert layer.pos[1].tolist() == [0, 3, 18, 25, 39, 40]


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="kv_sink must be >= 0, got -1"):
        KeyDiffParams(kv_sink=-1)
    with pytest.raises(ValueError, match="kv_recent must be >= 0, got -2"):
        KeyDiffParams(kv_recent=-2)
    with pytest.raises(ValueError, match=r"kv_budget must be in \(0, 1\], got 1.5"):
        make_policy("keydiff", 1.5)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['kv_window'\] for KV policy 'keydiff'"):
        make_policy("keydiff", 0.5, kv_window=8)

"""ThinK: query-driven key-channel pruning against naive computations, real reduced storage."""

from __future__ import annotations

import math

import pytest
import torch

import attnsieve
from attnsieve.cache import make_policy
from attnsieve.cache.think import ThinKParams, channel_scores
from attnsieve.kernels import dense_attention

from helpers import assert_close

SCALE = 0.3


def exact(qq, kk, vv):
    out, lse = dense_attention(qq, kk, vv, causal=True, scale=SCALE)
    return attnsieve.methods.AttnOutput(out, 0, lse=lse)


def qkv(B=2, H=4, Hkv=2, T=60, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv)]


def test_channel_scores_equal_the_frobenius_norm_of_each_channels_outer_product():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(12, 8, generator=g), torch.randn(30, 8, generator=g)
    naive = torch.stack([torch.linalg.matrix_norm(torch.outer(q[:, c], k[:, c])) for c in range(8)])
    assert_close(channel_scores(q, k), naive, atol=1e-5, rtol=1e-5)


def test_each_kv_head_keeps_the_channels_its_group_queries_use_most():
    B, H, Hkv, T, D, w = 2, 4, 2, 60, 16, 8
    q, k, v = qkv(B, H, Hkv, T, D)
    layer = make_policy("think", 0.25, kv_window=w).layer(0)
    layer.attend(q, k, v, None, SCALE, exact)
    G, n, r_keep = H // Hkv, T - w, 4
    for r in range(B * Hkv):
        b, h = divmod(r, Hkv)
        group = q[b, h * G : (h + 1) * G, T - w :].reshape(G * w, D)  # the group's observation window
        score = torch.zeros(D)
        for c in range(D):
            score[c] = torch.linalg.matrix_norm(torch.outer(group[:, c], k[b, h, :n, c]))
        want = torch.topk(score, r_keep).indices.sort().values
        seg = layer.segments[r][0]
        assert seg.channels.tolist() == want.tolist()
        assert seg.keys.shape == (n, r_keep)  # real reduced storage, not masked keys
        assert torch.equal(seg.keys, k[b, h, :n][:, want])
        assert torch.equal(layer.keys[r], k[b, h, n:])  # the observation window stays whole
        assert seg.pos.tolist() == list(range(n))


def test_decoding_equals_dense_attention_over_keys_with_the_pruned_channels_zeroed():
    B, H, Hkv, T, D = 1, 4, 2, 50, 16
    q, k, v = qkv(B, H, Hkv, T + 2, D, seed=1)
    layer = make_policy("think", 0.5, kv_window=6).layer(0)
    layer.attend(q[:, :, :T], k[:, :, :T], v[:, :, :T], None, SCALE, exact)
    layer.attend(q[:, :, T : T + 1], k[:, :, T : T + 1], v[:, :, T : T + 1], None, SCALE, exact)
    out, _ = layer.attend(q[:, :, T + 1 :], k[:, :, T + 1 :], v[:, :, T + 1 :], None, SCALE, exact)
    pruned = k.clone()
    for h in range(Hkv):
        seg = layer.segments[h][0]
        mask = torch.ones(D, dtype=torch.bool)
        mask[seg.channels] = False
        pruned[0, h, : seg.pos.numel(), mask] = 0
    ref, _ = dense_attention(q[:, :, T + 1 :], pruned, v, causal=True, scale=SCALE)
    assert_close(out, ref)
    assert [t.shape[0] for t in layer.keys] == [6 + 2] * Hkv  # decoded keys stay whole (as the paper's code)


def test_bytes_are_the_tensors_held_and_shrink_with_the_budget():
    q, k, v = qkv(1, 2, 1, 200, 32, seed=2)
    sizes = {}
    for budget in (1.0, 0.5, 0.25):
        layer = make_policy("think", budget, kv_window=8).layer(0)
        layer.attend(q, k, v, None, SCALE, exact)
        held = sum(t.numel() * t.element_size() for t in layer._held())
        assert layer.nbytes() == held
        sizes[budget] = layer.nbytes()
    assert not make_policy("think", 1.0).layer(0).segments  # budget 1.0 reduces nothing: the dense cache
    dense = 200 * (32 + 32) * 4 + 200 * 4  # keys + values fp32, int32 positions
    assert sizes[1.0] == dense
    kept = 192 * (16 + 32) * 4 + 8 * 64 * 4 + 200 * 4 + 16 * 8  # reduced keys, values, window, pos, channel ids
    assert sizes[0.5] == kept
    assert sizes[0.25] < sizes[0.5] < sizes[1.0]


def test_without_a_budget_the_paper_pruning_ratio_applies():
    layer = make_policy("think").layer(0)
    assert layer.kept_channels(256) == 256 - math.floor(0.4 * 256)
    assert make_policy("think", 0.3).layer(0).kept_channels(10) == 3


def test_model_generation_with_think_runs_and_saves_key_bytes():
    from tiny_models import tiny_gemma3

    model = tiny_gemma3()
    ids = torch.randint(3, 97, (1, 120), generator=torch.Generator().manual_seed(0))
    with attnsieve.patched(model, "dense", kv="think", kv_budget=0.25, kv_window=8):
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = out.cache
    assert cache.nbytes(compressed_only=True) < 0.7 * cache.dense_nbytes(compressed_only=True)
    assert all(int(n.sum()) == 123 for i, n in cache.stored_tokens().items() if cache.layers[i].kv.window is None)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match=r"kv_prune must be in \[0, 1\), got 1.0"):
        ThinKParams(kv_prune=1.0)
    with pytest.raises(ValueError, match="kv_window must be >= 1, got 0"):
        ThinKParams(kv_window=0)

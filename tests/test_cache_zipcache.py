"""ZipCache: normalised-attention saliency against a naive loop, mixed-precision parts, real bytes."""

from __future__ import annotations

import math

import pytest
import torch

import attnsieve
from attnsieve.cache import make_policy
from attnsieve.cache.zipcache import ZipCacheParams, quantize_part, salient_ratio_for_budget
from attnsieve.kernels import dense_attention

SCALE = 0.3


def exact(qq, kk, vv):
    out, lse = dense_attention(qq, kk, vv, causal=True, scale=SCALE)
    return attnsieve.methods.AttnOutput(out, 0, lse=lse)


def qkv(B=1, H=4, Hkv=2, T=40, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv)]


def test_salient_tokens_are_the_top_normalised_attention_scores():
    B, H, Hkv, T, D = 1, 4, 2, 40, 16
    q, k, v = qkv(B, H, Hkv, T, D)
    k[0, 0, 30] *= 4  # a late token: few queries see it, yet the ones that do attend it
    layer = make_policy("zipcache", kv_probe_ratio=1.0, kv_salient_ratio=0.25).layer(0)  # every query probes
    layer.attend(q, k, v, None, SCALE, exact)
    G = H // Hkv
    for h in range(Hkv):
        acc, seen_by = torch.zeros(T), torch.zeros(T)
        for g in range(G):
            for i in range(T):
                acc[: i + 1] += torch.softmax(q[0, h * G + g, i] @ k[0, h, : i + 1].T * SCALE, -1)
        for i in range(T):
            seen_by[: i + 1] += 1
        want = torch.topk(acc / seen_by, 10).indices.sort().values
        high, low = layer.parts[h]
        assert (high.keys.bits, low.keys.bits) == (4, 2)
        assert high.pos.long().tolist() == want.tolist()
        assert sorted(high.pos.tolist() + low.pos.tolist()) == list(range(T))


def test_probe_queries_are_the_recent_half_and_random_earlier_ones():
    layer = make_policy("zipcache", kv_probe_ratio=0.1).layer(3)
    real = torch.ones(200, dtype=torch.bool)
    probes = layer.probe_queries(200, real)
    assert probes.numel() == 20 and probes[-10:].tolist() == list(range(190, 200))
    assert torch.equal(probes, layer.probe_queries(200, real))  # deterministic
    real[:50] = False  # padding queries never probe
    assert bool((layer.probe_queries(200, real) >= 50).all())


def test_keys_are_quantised_per_channel_and_values_channel_separably_per_token():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(37, 16, generator=g), torch.randn(37, 16, generator=g) * torch.linspace(0.1, 10, 16)
    part = quantize_part(k, v, torch.arange(37, dtype=torch.int32), 4)
    assert part.keys.scale.shape == (1, 16)  # one scale per channel
    assert part.values.scale.shape == (37, 1)  # one scale per token
    assert torch.allclose(part.channel.float(), v.abs().amax(0).sqrt(), rtol=1e-3)
    assert part.keys.codes.shape == (37, 8) and part.values.codes.shape == (37, 8)  # two 4-bit codes a byte
    kd, vd = part.dequantize()
    assert (kd - k).abs().max() <= part.keys.scale.float().max() / 2 + 1e-3
    levels = (v / part.channel.float()).amax(1) - (v / part.channel.float()).amin(1)
    assert bool(((vd - v).abs() / part.channel.float() <= levels[:, None] / 15 / 2 + 1e-2).all())


def test_decoded_tokens_stay_full_until_the_residual_then_quantise_by_their_normalised_scores():
    T, R = 30, 5
    q, k, v = qkv(1, 2, 1, T + R, 16, seed=2)
    layer = make_policy("zipcache", kv_residual=R, kv_salient_ratio=0.4).layer(0)
    layer.attend(q[:, :, :T], k[:, :, :T], v[:, :, :T], None, SCALE, exact)
    assert layer.keys[0].shape[0] == 0 and len(layer.parts[0]) == 2
    acc, seen_by = torch.zeros(R), torch.zeros(R)
    for t in range(T, T + R):
        layer.attend(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], None, SCALE, exact)
        if t < T + R - 1:
            assert layer.keys[0].shape[0] == t - T + 1  # full precision tail
        keys, _, _ = layer.row_keys(0) if layer.keys[0].shape[0] else (None, None, None)
        if keys is not None:  # naive: this query's attention over everything stored, kept for the tail
            p = torch.softmax(q[0, :, t] @ keys.T * SCALE, -1).sum(0)[-(t - T + 1) :]
            acc[: t - T + 1] += p
            seen_by[: t - T + 1] += 1
            assert torch.allclose(layer.acc[0], acc[: t - T + 1], atol=1e-5)
    assert layer.keys[0].shape[0] == 0 and len(layer.parts[0]) == 4  # the residual was quantised
    assert int(layer.stored_tokens()) == T + R


def test_bytes_are_codes_plus_parameters_and_positions():
    q, k, v = qkv(1, 2, 1, 200, 32, seed=3)
    layer = make_policy("zipcache", kv_salient_ratio=0.5).layer(0)
    layer.attend(q, k, v, None, SCALE, exact)
    codes = 100 * 32 * (4 + 2) // 8 * 2  # keys and values, 100 tokens at 4 bits and 100 at 2
    key_params = 2 * (2 * 32 * 2)  # per part: fp16 scale and minimum per channel
    value_params = 200 * 2 * 2 + 2 * 32 * 2  # fp16 scale and minimum per token, fp16 channel scales per part
    assert layer.nbytes() == codes + key_params + value_params + 200 * 4
    assert layer.nbytes() < 0.14 * 200 * 2 * 32 * 4  # 3 bits on average, plus parameters and positions


def test_kv_bits_sets_both_widths_and_a_budget_sets_the_salient_ratio():
    p = ZipCacheParams(kv_bits=8)
    assert (p.kv_bits_high, p.kv_bits_low) == (8, 8)
    assert salient_ratio_for_budget(3 / 32, 4, 2) == pytest.approx(0.5)  # 3 bits on average of fp32
    layer = make_policy("zipcache", 3 / 32).layer(0)
    q, k, v = qkv(1, 2, 1, 20, 16)
    layer.attend(q, k, v, None, SCALE, exact)
    assert layer.ratio == pytest.approx(0.5)
    assert [p.pos.numel() for p in layer.parts[0]] == [10, 10]


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match=r"kv_bits must be one of \(2, 4, 8\), got 3"):
        ZipCacheParams(kv_bits=3)
    with pytest.raises(ValueError, match=r"kv_bits_low \(4\) must be <= kv_bits_high \(2\)"):
        ZipCacheParams(kv_bits_high=2, kv_bits_low=4)
    with pytest.raises(ValueError, match="kv_residual must be >= 1, got 0"):
        ZipCacheParams(kv_residual=0)
    with pytest.raises(ValueError, match=r"kv_salient_ratio must be in \[0, 1\], got 1.5"):
        ZipCacheParams(kv_salient_ratio=1.5)


def test_padded_batch_generates_and_stores_only_real_tokens():
    from tiny_models import tiny_gemma3

    model = tiny_gemma3()
    ids = torch.randint(3, 97, (2, 90), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    with attnsieve.patched(model, "dense", kv="zipcache", kv_bits=8, kv_residual=2):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             return_dict_in_generate=True)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out.sequences, ref)  # 8 bits: the same greedy tokens on this tiny model
    stored = out.cache.stored_tokens()
    assert all(n.view(-1).tolist() == [86, 93] for i, n in stored.items() if out.cache.layers[i].kv.window is None)
    assert math.isfinite(max(layer.kv.reconstruction_error() for layer in out.cache.layers
                             if layer.kv.window is None))

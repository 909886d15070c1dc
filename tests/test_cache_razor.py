"""RazorAttention: echo/induction scores against a naive loop, planted heads, compensation token exactness."""

from __future__ import annotations

import math

import pytest
import torch

import attnsieve
from attnsieve.cache import make_policy
from attnsieve.cache.razor import RazorParams, retrieval_heads
from attnsieve.kernels import dense_attention
from attnsieve.signals.calibration import calibrate_razor, echo_induction_mass

from helpers import assert_close
from tiny_models import tiny_llama

SCALE = 0.3


def exact(qq, kk, vv):
    out, lse = dense_attention(qq, kk, vv, causal=True, scale=SCALE)
    return attnsieve.methods.AttnOutput(out, 0, lse=lse)


def test_echo_and_induction_mass_equal_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    H, Hkv, T, D, start, P = 4, 2, 23, 8, 1, 7
    q, k = torch.randn(1, H, T, D, generator=g), torch.randn(1, Hkv, T, D, generator=g)
    echo, induction, n = echo_induction_mass(q, k, SCALE, start, P)
    want_e, want_i = torch.zeros(H), torch.zeros(H)
    for h in range(H):
        for i in range(start + P, T):
            p = torch.softmax(q[0, h, i] @ k[0, h // 2, : i + 1].T * SCALE, -1)
            for j in range(start, i):
                if (i - j) % P == 0:
                    want_e[h] += p[j]
                    want_i[h] += p[j + 1]
    assert n == T - start - P
    assert_close(echo, want_e, atol=1e-5, rtol=1e-5)
    assert_close(induction, want_i, atol=1e-5, rtol=1e-5)


def test_planted_echo_and_induction_heads_score_highest():
    P, R, D = 10, 3, 16
    tokens = torch.arange(P).repeat(R)  # token t at every position i with i % P == t
    emb = torch.eye(D)[tokens] * 6  # one direction per token
    prev = torch.cat([torch.zeros(1, D), emb[:-1]])  # the previous token's direction
    noise = torch.randn(4, P * R, D, generator=torch.Generator().manual_seed(1))
    q = torch.stack([emb, emb, noise[0], noise[1]])[None]  # head 0: echo; head 1: induction; 2, 3: noise
    k = torch.stack([emb, prev, noise[2], noise[3]])[None]  # MHA: one KV head per query head
    echo, induction, _ = echo_induction_mass(q, k, 1.0, 0, P)
    assert echo.argmax() == 0 and induction.argmax() == 1
    assert echo[0] > 0.4 and induction[1] > 0.9  # the echo head splits its mass with the query itself


def test_retrieval_heads_unite_top_echo_and_induction_heads():
    echo = {0: [0.9, 0.1, 0.0], 1: [0.2, 0.3, 0.1]}
    induction = {0: [0.5, 0.0, 0.1], 1: [0.1, 0.8, 0.7]}
    assert retrieval_heads(echo, induction, 0.2, 0.4, None) == {(0, 0), (1, 1), (1, 2)}
    assert retrieval_heads(echo, induction, 0.01, 0.14, 0.5) == {(1, 1), (1, 2), (0, 0)}  # 3 heads, 0 by echo
    assert retrieval_heads(echo, induction, 0.5, 0.5, 2 / 3) == {(0, 0), (1, 1), (1, 2), (0, 2)}  # ties: lower layer


def test_non_retrieval_heads_attend_kept_tokens_plus_a_compensation_token_weighted_by_its_count():
    H, Hkv, T, D = 2, 2, 50, 8
    g = torch.Generator().manual_seed(2)
    q, k, v = [torch.randn(1, h, T + 1, D, generator=g) for h in (H, Hkv, Hkv)]
    cal = {"echo": {0: [0.0, 1.0]}, "induction": {0: [0.0, 1.0]}}
    layer = make_policy("razor", 0.5, kv_sink=2, kv_recent=8, kv_compression=100, kv_calibration=cal).layer(0)
    layer.attend(q[:, :, :T], k[:, :, :T], v[:, :, :T], None, SCALE, exact)
    assert layer.pos[0].tolist() == [0, 1, *range(T - 8, T)] and layer.pos[1].numel() == T
    dropped = slice(2, T - 8)
    assert layer.comp_n == [T - 10, 0]
    assert_close(layer.comp_k[0], k[0, 0, dropped].mean(0))
    assert_close(layer.comp_v[0], v[0, 0, dropped].mean(0))
    out, _ = layer.attend(q[:, :, T:], k[:, :, T:], v[:, :, T:], None, SCALE, exact)
    keep = [0, 1, *range(T - 8, T + 1)]  # head 0 after the step: sinks, recent, the new token
    s = torch.cat([q[0, 0, T] @ k[0, 0, keep].T * SCALE, (q[0, 0, T] @ k[0, 0, dropped].mean(0) * SCALE)[None]])
    w = torch.exp(s - s.max()) * torch.cat([torch.ones(len(keep)), torch.tensor([float(T - 10)])])
    ref = (w[:, None] * torch.cat([v[0, 0, keep], v[0, 0, dropped].mean(0)[None]])).sum(0) / w.sum()
    assert_close(out[0, 0, 0], ref, atol=1e-5, rtol=1e-5)
    full, _ = dense_attention(q[:, 1:, T:], k[:, 1:], v[:, 1:], causal=True, scale=SCALE)
    assert_close(out[0, 1], full[0, 0])  # the retrieval head is exact
    assert layer.comp_n[0] == T - 10 + 1  # one more token folded after the step


def test_buffer_grows_with_the_compression_ratio_and_bytes_count_the_compensation():
    H, T, D = 1, 200, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = [torch.randn(1, H, T, D, generator=g) for _ in range(3)]
    cal = {"echo": {0: [0.0]}, "induction": {0: [0.0]}}
    layer = make_policy("razor", kv_sink=4, kv_recent=10, kv_compression=5, kv_calibration=cal).layer(0)
    layer.attend(q, k, v, None, SCALE, exact)
    assert layer.pos[0].numel() == 4 + math.ceil(T / 5)
    kept = 44
    assert layer.nbytes() == kept * (2 * D * 4 + 4) + 2 * D * 4 + 8  # kept tokens, compensation k/v, count


def test_calibration_on_a_tiny_model_is_cached_and_drives_the_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSIEVE_CACHE", str(tmp_path))

    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    model = tiny_llama()
    cal = calibrate_razor(model, Tok(), period=30, repeats=3, name="tiny-llama", progress=False)
    assert sorted(cal["echo"]) == [0, 1] and all(len(v) == 2 for v in cal["induction"].values())
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("a cached calibration must not run"))
    assert calibrate_razor(model, Tok(), period=30, repeats=3, name="tiny-llama") == cal
    policy = make_policy("razor", 0.5, kv_calibration="tiny-llama")
    assert len(policy.retrieval) == 2
    with pytest.raises(ValueError, match=r"calibrate_razor\(model, tok\)"):
        make_policy("razor", 0.5)
    with pytest.raises(ValueError, match="kv_compression must be >= 1, got 0.5"):
        RazorParams(kv_compression=0.5)


def test_generation_with_razor_keeps_retrieval_heads_whole():
    model = tiny_llama()
    ids = torch.randint(3, 97, (1, 150), generator=torch.Generator().manual_seed(4))
    cal = {"echo": {0: [0.0, 0.0], 1: [0.0, 0.0]}, "induction": {0: [0.0, 0.9], 1: [0.0, 0.0]}}
    with attnsieve.patched(model, "dense", kv="razor", kv_budget=0.25, kv_recent=16, kv_calibration=cal):
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    stored = out.cache.stored_tokens()
    buffer = max(16, math.ceil(153 / 5))
    assert stored[0].tolist() == [[4 + buffer, 153]] and stored[1].tolist() == [[4 + buffer, 4 + buffer]]
    assert out.cache.nbytes() < 0.6 * out.cache.dense_nbytes()

"""ChunkKV: SnapKV-press scores and chunk selection against naive loops, planted chunks, parameter errors."""

from __future__ import annotations

import math

import pytest
import torch
from test_cache_keydiff import naive_keydiff

import attnsieve
from attnsieve.cache import make_policy
from attnsieve.cache.chunkkv import ChunkKVParams, snapkv_press_scores
from attnsieve.kernels import dense_attention

from helpers import assert_close

SCALE = 0.3


def exact(qq, kk, vv):
    out, lse = dense_attention(qq, kk, vv, causal=True, scale=SCALE)
    return attnsieve.methods.AttnOutput(out, 0, lse=lse)


def naive_snapkv_press(q, k, window, kernel):
    """One batch row's token scores [Hkv, T] as kvpress `kvpress/presses/snapkv_press.py` SnapKVPress.score:
    the last `window` queries' causal attention averaged over them and the group's heads, the tokens
    before the window average-pooled (zero padding counted), the window set to the maximum + 1."""
    H, T, _ = q.shape
    Hkv = k.shape[0]
    G = H // Hkv
    out = torch.zeros(Hkv, T)
    for h in range(Hkv):
        s = torch.zeros(T)
        for g in range(G):
            for i in range(T - window, T):
                s[: i + 1] += torch.softmax(q[h * G + g, i] @ k[h, : i + 1].T * SCALE, -1) / (G * window)
        for j in range(T - window):
            out[h, j] = sum(s[t] for t in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= t < T - window) / kernel
    out[:, T - window :] = out[:, : T - window].max() + 1
    return out


def naive_chunks(scores, chunk, n, forced):
    """Kept token indices: chunks ranked by the mean of the head-summed scores (kvpress ChunkKVPress.compress,
    the last chunk shorter), each taken whole if it still fits in n beside the forced tokens and earlier chunks."""
    total = scores.sum(0).tolist()
    L = len(total)
    spans = [range(s, min(s + chunk, L)) for s in range(0, L, chunk)]
    means = [sum(total[t] for t in sp) / len(sp) for sp in spans]
    kept = set(forced)
    for c in sorted(range(len(spans)), key=lambda c: (-means[c], c)):
        if len(kept | set(spans[c])) <= n:
            kept |= set(spans[c])
    return sorted(kept)


@pytest.mark.parametrize("T,chunk", [(50, 7), (63, 9), (40, 20)], ids=["partial-1", "whole-chunks", "two-chunks"])
def test_snapkv_scores_and_chunks_equal_naive_loops(T, chunk):
    g = torch.Generator().manual_seed(T)
    B, H, Hkv, D, w, kernel, budget = 2, 4, 2, 8, 6, 5, 0.45
    q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D)
    full = make_policy("chunkkv", 1.0, kv_window=w, kv_kernel=kernel).layer(0)
    full.attend(q, k, v, None, SCALE, exact)
    scores = snapkv_press_scores(full, q, None, SCALE, w, kernel)
    layer = make_policy("chunkkv", budget, kv_chunk=chunk, kv_window=w, kv_kernel=kernel, kv_sink=2).layer(0)
    layer.attend(q, k, v, None, SCALE, exact)
    for b in range(B):
        want = naive_snapkv_press(q[b], k[b], w, kernel)
        for h in range(Hkv):
            assert_close(scores[b * Hkv + h], want[h], atol=1e-5, rtol=1e-5)
        kept = naive_chunks(want, chunk, math.ceil(budget * T), [0, 1])
        for h in range(Hkv):  # the same chunks for every KV head of the row
            assert layer.pos[b * Hkv + h].tolist() == kept
            assert torch.equal(layer.keys[b * Hkv + h], k[b, h, kept])


def test_keydiff_inner_scorer_equals_a_naive_loop():
    g = torch.Generator().manual_seed(5)
    H, Hkv, T, D = 2, 2, 45, 8
    q, k, v = torch.randn(1, H, T, D, generator=g), torch.randn(1, Hkv, T, D, generator=g), torch.randn(1, Hkv, T, D)
    layer = make_policy("chunkkv", 0.5, kv_scorer="keydiff", kv_chunk=10, kv_sink=0).layer(0)
    layer.attend(q, k, v, None, SCALE, exact)
    want = torch.stack([naive_keydiff(k[0, h]) for h in range(Hkv)])
    kept = naive_chunks(want, 10, 23, [])
    assert layer.pos[0].tolist() == layer.pos[1].tolist() == kept


def planted(T, chunk_of_row, pad=0, D=8):
    """Window queries along e0; keys zero except one planted run per row along e0 (head 0 strong, head 1 weak)."""
    B = len(chunk_of_row)
    q, k = torch.zeros(B, 2, T, D), torch.zeros(B, 2, T, D)
    q[..., 0] = 3.0
    for b, (strong, weak) in enumerate(chunk_of_row):
        off = pad if b == 1 else 0
        k[b, 0, off + strong[0] : off + strong[1], 0] = 3.0
        k[b, 1, off + weak[0] : off + weak[1], 0] = 1.5
    return q, k, torch.randn(B, 2, T, D, generator=torch.Generator().manual_seed(0))


def test_planted_chunks_are_kept_whole_for_every_head_and_row():
    # T = 60, chunks of 10, window 10 = chunk 5; budget ceil(0.34 * 60) = 21 = sink + two chunks
    q, k, v = planted(60, [((20, 30), (40, 50)), ((10, 20), (30, 40))])
    layer = make_policy("chunkkv", 0.34, kv_chunk=10, kv_window=10, kv_sink=1).layer(0)
    layer.attend(q, k, v, None, 1.0, exact)
    row0 = [0, *range(20, 30), *range(50, 60)]  # head 0's strong chunk wins over head 1's weak one
    row1 = [0, *range(10, 20), *range(50, 60)]
    assert [p.tolist() for p in layer.pos] == [row0, row0, row1, row1]


def test_a_chunk_that_does_not_fit_is_skipped_and_one_holding_the_sinks_costs_its_other_tokens():
    # budget 30: sinks 0-3, the window chunk 50-59 and the planted 20-29 make 24; head 1's chunk 40-49 (third)
    # and the unplanted 10-19 and 30-39 need 10 more, but 0-9 needs only 6
    q, k, v = planted(60, [((20, 30), (40, 50))])
    layer = make_policy("chunkkv", 0.5, kv_chunk=10, kv_window=10, kv_sink=4).layer(0)
    layer.attend(q, k, v, None, 1.0, exact)
    assert layer.pos[0].tolist() == layer.pos[1].tolist() == [*range(0, 10), *range(20, 30), *range(50, 60)]


def test_left_padding_never_shifts_chunks_and_the_last_partial_chunk_counts_as_one():
    # row 1 is left-padded by 3: its chunks start at its first real token (position 3)
    T, pad = 65, 3
    q, k, v = planted(T, [((20, 30), (40, 50)), ((10, 20), (30, 40))], pad=pad)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :pad] = False
    layer = make_policy("chunkkv", 0.24, kv_chunk=10, kv_window=5, kv_sink=1).layer(0)
    layer.attend(q, k, v, valid, 1.0, exact)
    # row 0: 65 tokens, ceil(0.24 * 65) = 16 = sink + the partial window chunk (60-64) + one chunk
    assert layer.pos[0].tolist() == [0, *range(20, 30), *range(60, 65)]
    # row 1: 62 real tokens, ceil(0.24 * 62) = 15; its chunks are positions 3-12, ..., 53-62 and 63-64 (the
    # window's last two), and 53-62, holding the window's first three, outranks the planted chunk 13-22
    assert layer.pos[2].tolist() == [3, *range(53, 65)]
    assert layer.pos[3].tolist() == layer.pos[2].tolist()


def test_budget_under_one_chunk_keeps_forced_tokens_and_short_prompts_score_per_head():
    q, k, v = planted(60, [((20, 30), (40, 50))])
    layer = make_policy("chunkkv", 0.1, kv_chunk=10, kv_window=10, kv_sink=2).layer(0)
    layer.attend(q, k, v, None, 1.0, exact)
    assert [p.tolist() for p in layer.pos] == [[0, 1], [0, 1]]  # 6 tokens: no whole chunk fits beside the sink
    q, k, v = planted(16, [((4, 6), (9, 11))])  # 16 tokens < one chunk of 20: token scores per head
    layer = make_policy("chunkkv", 0.3, kv_window=2, kv_kernel=1, kv_sink=1).layer(0)  # ceil(4.8) = 5 tokens
    layer.attend(q, k, v, None, 1.0, exact)
    assert [p.tolist() for p in layer.pos] == [[0, 4, 5, 14, 15], [0, 9, 10, 14, 15]]


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="kv_chunk must be >= 1, got 0"):
        ChunkKVParams(kv_chunk=0)
    with pytest.raises(ValueError, match="kv_scorer must be one of snapkv, keydiff, got 'h2o'"):
        ChunkKVParams(kv_scorer="h2o")
    with pytest.raises(ValueError, match="kv_window must be >= 1, got 0"):
        ChunkKVParams(kv_window=0)
    with pytest.raises(ValueError, match="kv_kernel must be an odd number >= 1, got 4"):
        ChunkKVParams(kv_kernel=4)
    with pytest.raises(ValueError, match="kv_sink must be >= 0, got -1"):
        ChunkKVParams(kv_sink=-1)

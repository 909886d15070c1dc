"""KVzip: replay scores against a naive loop, the passes it builds, one budget across layers, exactness."""

from __future__ import annotations

import math

import pytest
import torch

import attnsieve
from attnsieve.cache import make_policy
from attnsieve.cache.kvzip import FIRST_PROMPT, NEXT_PROMPT, chunk_scores, repeat_prompts

from helpers import CharTokenizer, assert_close
from tiny_models import tiny_gemma3, tiny_llama


def naive_chunk_scores(q, k_sink, k_chunk, k_new, scale):
    """NVIDIA kvpress `kvpress/presses/kvzip_press.py`, `KVzipPress.score_kvzip`, one query at a time:
    keys = sink + chunk + the replayed tokens up to the query itself; softmax; the chunk's probabilities;
    max over the group's heads and the replayed queries."""
    G, n, _ = q.shape
    best = torch.zeros(k_chunk.shape[0])
    for g in range(G):
        for i in range(n):
            keys = torch.cat([k_sink, k_chunk, k_new[: i + 1]]).double()
            p = torch.softmax(q[g, i].double() @ keys.T * scale, -1)
            best = torch.maximum(best, p[k_sink.shape[0] : k_sink.shape[0] + k_chunk.shape[0]].float())
    return best


def test_chunk_scores_equal_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    q, ks, kc, kn = (torch.randn(*s, generator=g) for s in [(3, 9, 8), (2, 8), (11, 8), (9, 8)])
    assert_close(chunk_scores(q, ks, kc, kn, 0.4), naive_chunk_scores(q, ks, kc, kn, 0.4), atol=1e-6, rtol=1e-5)
    # no sink tokens (the first chunk of a context that starts at token 0)
    assert_close(chunk_scores(q, ks[:0], kc, kn, 0.4), naive_chunk_scores(q, ks[:0], kc, kn, 0.4), atol=1e-6,
                 rtol=1e-5)


def test_replay_passes_quote_the_previous_chunk_and_skip_the_bos():
    tok = CharTokenizer()
    pol = make_policy("kvzip", 0.5, kv_chunk_size=4, kv_overlap=2)
    layer = pol.layer(0)
    rows = [[1, 10, 11, 12, 13, 14, 15, 16, 17, 18]]  # BOS + 9 tokens: chunks of 4, 4, 1
    k = torch.zeros(1, 1, 10, 4)
    layer._init(k, k)
    layer.absorb(torch.zeros(1, 1, 10, 4), k, k, None, 1.0)
    passes = pol.replay_passes([layer], rows, tok)
    pr = repeat_prompts(tok)
    assert pr.first == tok.encode(FIRST_PROMPT) and pr.suffix == tok.encode("\n")
    want = [
        (pr.first + pr.suffix + [10, 11, 12, 13], (1, 5)),
        (pr.later + [12, 13] + pr.suffix + [14, 15, 16, 17], (5, 9)),
        (tok.encode(NEXT_PROMPT) + [16, 17] + pr.suffix + [18], (9, 10)),
    ]
    assert [(p.ids[0][p.mask[0]].tolist(), p.spans[0]) for p in passes] == want
    assert layer.zscore[0][0] == 0 and torch.isinf(layer.zscore[0][1:]).all()  # BOS scores 0 (forced sinks keep it)


def test_model_scores_equal_replay_attention_computed_by_hand():
    """The scores a tiny model's replay gives every stored token equal the naive formula applied to the
    queries and keys of one unpatched-style forward over context + replay input (the same positions)."""
    tok = CharTokenizer()
    model = tiny_llama()
    g = torch.Generator().manual_seed(7)
    ctx = torch.randint(3, 97, (1, 40), generator=g)
    got = {}
    with attnsieve.patched(model, "dense", kv="kvzip", kv_budget=0.5, kv_chunk_size=16, kv_overlap=3,
                           tokenizer=tok) as p:
        p.kv.finish_replay = lambda layers: got.update({L.layer_idx: [z.clone() for z in L.zscore] for L in layers})
        model(ctx, use_cache=True)
    pr = repeat_prompts(tok)
    chunks = [(0, 16), (16, 32), (32, 40)]
    with attnsieve.patched(model, "dense") as p:
        for i, (s, e) in enumerate(chunks):
            head = pr.first if i == 0 else pr.later + ctx[0, max(0, s - 3) : s].tolist()
            rep = torch.tensor([head + pr.suffix + ctx[0, s:e].tolist()])
            with p.capturing() as cap:
                model(torch.cat([ctx, rep], dim=1), use_cache=False)
            for li, c in cap.items():
                H, Hkv = c.q.shape[1], c.k.shape[1]
                G = H // Hkv
                for h in range(Hkv):
                    q = c.q[0, h * G : (h + 1) * G, 40:]
                    k = c.k[0, h]
                    want = naive_chunk_scores(q, k[: min(4, s)], k[s:e], k[40:], c.ctx.scale)
                    assert_close(got[li][h][s:e], want, atol=1e-5, rtol=1e-4, what=f"layer {li} head {h} chunk {i}")


def test_one_budget_across_layers_and_heads_real_storage():
    model = tiny_llama()
    ids = torch.randint(3, 97, (1, 120), generator=torch.Generator().manual_seed(2))
    with attnsieve.patched(model, "dense", kv="kvzip", kv_budget=0.25, tokenizer=CharTokenizer()):
        cache = model(ids, use_cache=True).cache
    lengths = [row.numel() for layer in cache.layers for row in layer.kv.pos]
    assert sum(lengths) == len(lengths) * math.ceil(0.25 * 120)  # the whole cache's budget ...
    assert len(set(lengths)) > 1  # ... shared unevenly (the reference's non-layerwise selection)
    assert cache.get_seq_length() == 120  # the replayed tokens were never stored
    for layer in cache.layers:
        assert [k.shape[0] for k in layer.kv.keys] == [r.numel() for r in layer.kv.pos]
        assert layer.kv.pos[0][:4].tolist() == [0, 1, 2, 3]  # forced sinks
    with attnsieve.patched(model, "dense", kv="kvzip", kv_budget=0.25, kv_layerwise=True, tokenizer=CharTokenizer()):
        cache = model(ids, use_cache=True).cache
    for layer in cache.layers:
        assert sum(r.numel() for r in layer.kv.pos) == len(layer.kv.pos) * math.ceil(0.25 * 120)


def test_sliding_layers_and_measurements_are_untouched_by_the_replay():
    model = tiny_gemma3(sliding_window=24)
    ids = torch.randint(3, 97, (1, 90), generator=torch.Generator().manual_seed(3))
    with attnsieve.patched(model, "dense", kv="kvzip", kv_budget=1.0) as p:  # keeps everything, replays nothing
        ref = model(ids, use_cache=True).cache
    with attnsieve.patched(model, "dense", kv="kvzip", kv_budget=0.3, kv_chunk_size=32, tokenizer=CharTokenizer()) as p:
        cache = model(ids, use_cache=True).cache
        assert {r.phase for r in p.stats.records} == {"prefill"}
        assert len(p.stats.records) == model.config.num_hidden_layers  # the prefill only, not the replay
    for i, layer in enumerate(cache.layers):
        if p.windows[i] is not None:  # a sliding layer holds its window, exactly as without the policy
            assert torch.equal(layer.kv.pos[0], ref.layers[i].kv.pos[0])
            assert torch.equal(layer.kv.keys[0], ref.layers[i].kv.keys[0])


def test_left_padded_batch_rows_select_as_they_would_alone():
    model = tiny_llama()
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(3, 97, (1, 70), generator=g), torch.randint(3, 97, (1, 58), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 12, dtype=torch.long), b], 1)])
    mask = (ids != 0).long()
    mask[0] = 1
    kw = dict(kv="kvzip", kv_budget=0.3, kv_chunk_size=32, tokenizer=CharTokenizer())
    out = {}
    with attnsieve.patched(model, "dense", **kw) as p:
        orig = p.kv.finish_replay

        def grab(layers, key):
            out[key] = [[z.clone() for z in L.zscore] for L in layers]
            orig(layers)

        for key, x, m in [("batch", ids, mask), ("a", a, None), ("b", b, None)]:
            p.kv.finish_replay = lambda layers, key=key: grab(layers, key)
            model.generate(x, attention_mask=m, max_new_tokens=1, do_sample=False)
    kept = out
    Hkv = model.config.num_key_value_heads
    for li in range(len(kept["a"])):
        for h in range(Hkv):
            assert_close(kept["batch"][li][h], kept["a"][li][h], atol=1e-5, rtol=1e-4)
            assert_close(kept["batch"][li][Hkv + h], kept["b"][li][h], atol=1e-5, rtol=1e-4)


def test_query_agnostic_kvzip_never_replays_the_question():
    model = tiny_llama()
    g = torch.Generator().manual_seed(5)
    ctx, qa, qb = (torch.randint(3, 97, (1, n), generator=g) for n in (100, 9, 9))
    with attnsieve.patched(model, "dense", kv="kvzip", kv_budget=0.25, tokenizer=CharTokenizer()) as p:
        kept = []
        for q in (qa, qb):
            cache = p.compress_context(ctx)
            before = [[r.clone() for r in layer.kv.pos] for layer in cache.layers]
            model(q, cache=cache, use_cache=True)
            for layer, rows in zip(cache.layers, before, strict=True):
                for r, p0 in enumerate(rows):
                    assert layer.kv.pos[r].tolist() == p0.tolist() + list(range(100, 109))
            kept.append(before)
    assert all(torch.equal(x, y) for la, lb in zip(*kept, strict=True) for x, y in zip(la, lb, strict=True))


def test_kvzip_errors_are_clear():
    model = tiny_llama()
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        attnsieve.patch(model, "dense", kv="kvzip", kv_budget=0.5)
    assert not hasattr(model, attnsieve.integrations.hf._STATE)  # nothing patched
    with attnsieve.patched(model, "dense", kv="kvzip", kv_budget=1.0):  # keeps everything: no replay, no tokenizer
        pass
    for bad, msg in [({"kv_chunk_size": 0}, "kv_chunk_size must be >= 1"), ({"kv_overlap": -1}, "kv_overlap")]:
        with pytest.raises(ValueError, match=msg):
            make_policy("kvzip", 0.5, **bad)

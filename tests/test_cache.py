"""KV-cache policies: exact when keeping everything, real storage when compressing, right positions."""

from __future__ import annotations

import math

import pytest
import torch

import attnsieve
from attnsieve.cache import LayerKV, make_policy, policy_class, policy_names
from attnsieve.cache.pyramidkv import layer_budget
from attnsieve.kernels import dense_attention

from helpers import CharTokenizer, assert_close
from tiny_models import MODELS, tiny_gemma3, tiny_llama

POLICIES = policy_names()
EVICTING = [n for n in POLICIES if policy_class(n).kind == "eviction"]
QUANTISING = [n for n in POLICIES if policy_class(n).kind == "quantisation"]
EXACT_AT_FULL_BUDGET = [n for n in POLICIES if n not in QUANTISING]


def extra(name: str) -> dict:
    """What patch() needs beyond the policy for `name`: a tokenizer for policies that replay text."""
    return {"tokenizer": CharTokenizer()} if policy_class(name).replays else {}


def keep_all(name: str) -> dict:
    """Parameters beyond kv_budget=1 that make `name` keep everything (zipvl's mass threshold)."""
    return {"kv_tau": 1.0} if name == "zipvl" else {}


def prompt(B=1, T=60, seed=0, pad=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        ids[0, :pad] = 0
        mask[0, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("name", EXACT_AT_FULL_BUDGET)
@pytest.mark.parametrize("arch", MODELS)
def test_budget_keeping_everything_generates_exactly_as_dense(name, arch):
    model = MODELS[arch]()
    ids, mask = prompt(B=2, pad=7)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    with attnsieve.patched(model, "dense", kv=name, kv_budget=1.0, **keep_all(name)):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", EVICTING)
def test_eviction_frees_memory_and_keeps_the_budget(name):
    model = tiny_llama()
    ids, _ = prompt(T=200)
    with attnsieve.patched(model, "dense", kv=name, kv_budget=0.25, **extra(name)) as p:
        cache = model(ids, use_cache=True).cache
    assert cache.get_seq_length() == 200  # tokens seen: generate's positions stay right
    lengths = [row.numel() for layer in cache.layers for row in layer.kv.pos]
    per_token = sum(layer.kv.keys[0].shape[-1] * 4 * 2 + 4 for layer in cache.layers)  # k + v fp32, int32 pos
    assert sum(lengths) * per_token / len(cache.layers) == pytest.approx(cache.nbytes(), rel=0.05)
    if name == "adakv":  # heads share the layer's budget unevenly
        assert all(sum(r.numel() for r in layer.kv.pos) <= 2 * 50 for layer in cache.layers)
    elif name not in ("pyramidkv", "kvzip"):  # these share one budget unevenly across layers
        assert max(lengths) <= math.ceil(0.25 * 200)
    assert cache.nbytes() <= 0.27 * cache.dense_nbytes()
    for layer in cache.layers:  # tensor sizes, not masks
        assert [t.shape[0] for t in layer.kv.keys] == [r.numel() for r in layer.kv.pos]
    assert p.stats.density("prefill") == pytest.approx(1.0)


def reachable_bytes(obj, seen=None, storages=None) -> int:
    """Bytes of every tensor storage reachable from obj's attributes (lists, tuples, dicts, objects),
    the policy's shared parameters and the model's rotary tables left out: what the cache keeps alive."""
    seen = set() if seen is None else seen
    storages = {} if storages is None else storages
    if id(obj) in seen:
        return sum(storages.values())
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    elif isinstance(obj, (list, tuple, set)) or type(obj).__name__ == "deque":
        for x in obj:
            reachable_bytes(x, seen, storages)
    elif isinstance(obj, dict):
        for x in obj.values():
            reachable_bytes(x, seen, storages)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for key, x in vars(obj).items():
            if key not in ("policy", "p", "rotary"):
                reachable_bytes(x, seen, storages)
    return sum(storages.values())


@pytest.mark.parametrize("name", POLICIES)
def test_evicted_memory_is_released_not_just_uncounted(name):
    """What the cache keeps alive is what nbytes() reports (within 10%): evicted or compressed tokens
    leave no buffer behind, after the prompt and after decoding steps."""
    if name in ("duo", "razor"):
        pytest.skip("needs a calibration run (its own tests cover memory)")
    model = tiny_llama()
    ids, _ = prompt(T=400)
    with attnsieve.patched(model, "dense", kv=name, kv_budget=0.25, **extra(name)):
        out = model(ids, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
        for step in range(3):
            for layer in cache.layers:
                assert reachable_bytes(layer.kv) <= 1.1 * layer.kv.nbytes(), (name, step, layer.kv.layer_idx)
            nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)


@pytest.mark.parametrize("arch", MODELS)
def test_decoding_a_padded_batch_at_full_budget_counts_every_cell(arch):
    """With nothing evicted, a left-padded batch's decoding steps compute exactly the exact layer's
    cells (sliding layers included): the counts taken from the rows' lengths match the mask's."""
    model = MODELS[arch]()
    ids, mask = prompt(B=2, T=60, pad=9)
    with attnsieve.patched(model, "dense", kv="snapkv", kv_budget=1.0) as p:
        model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert p.stats.density("decode") == pytest.approx(1.0)


def test_sliding_layers_keep_exactly_their_window():
    model = tiny_gemma3(sliding_window=24)
    ids, _ = prompt(T=100)
    with attnsieve.patched(model, "dense", kv="snapkv", kv_budget=0.5):
        cache = model(ids, use_cache=True).cache
    for layer in cache.layers:
        pos = layer.kv.pos[0]
        if layer.kv.window is not None:
            assert pos.tolist() == list(range(100 - 23, 100))
        else:
            assert pos.numel() == 50 and pos[0] == 0  # the first token is always kept
    assert cache.nbytes(compressed_only=True) <= 0.52 * cache.dense_nbytes(compressed_only=True)


def test_decoding_over_an_evicted_cache_equals_dense_attention_over_the_kept_keys():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 80, 16
    q, k, v = torch.randn(B, H, T + 1, D, generator=g), torch.randn(B, Hkv, T + 1, D, generator=g), torch.randn(
        B, Hkv, T + 1, D, generator=g
    )
    policy = make_policy("snapkv", 0.3, kv_window=8)
    layer = policy.layer(0)

    def exact(qq, kk, vv):
        out, lse = dense_attention(qq, kk, vv, causal=True, scale=0.25)
        return attnsieve.methods.AttnOutput(out, 0, lse=lse)

    layer.attend(q[:, :, :T], k[:, :, :T], v[:, :, :T], None, 0.25, exact)
    kept = [p.long() for p in layer.pos]  # per row
    out, _ = layer.attend(q[:, :, T:], k[:, :, T:], v[:, :, T:], None, 0.25, exact)
    allowed = torch.zeros(B, Hkv, T + 1, dtype=torch.bool)
    for r, p in enumerate(kept):
        allowed[r // Hkv, r % Hkv, p] = True
    allowed[:, :, T] = True
    mask = allowed[:, :, None, :]  # [B, Hkv, 1, T+1]: per KV head, shared by its query heads
    ref, _ = dense_attention(q[:, :, T:], k, v, causal=True, scale=0.25, mask=mask)
    assert_close(out, ref)


def test_streaming_keeps_sinks_and_the_most_recent_tokens():
    model = tiny_llama()
    ids, _ = prompt(T=100)
    with attnsieve.patched(model, "dense", kv="streaming", kv_budget=0.2, kv_sink=4):
        cache = model(ids, use_cache=True).cache
    assert cache.layers[0].kv.pos[0].tolist() == [0, 1, 2, 3, *range(84, 100)]


def test_snapkv_scores_equal_a_naive_computation():
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, T, D, w = 1, 4, 2, 50, 8, 6
    q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D)
    layer = make_policy("snapkv", 0.4, kv_window=w, kv_kernel=3, kv_pooling="avg", kv_sink=1).layer(0)

    def exact(qq, kk, vv):
        out, lse = dense_attention(qq, kk, vv, causal=True, scale=0.3)
        return attnsieve.methods.AttnOutput(out, 0, lse=lse)

    layer.attend(q, k, v, None, 0.3, exact)
    for h in range(Hkv):
        s = torch.zeros(T)
        for g_ in range(H // Hkv):
            qh = q[0, h * (H // Hkv) + g_]
            for i in range(T - w, T):
                p = torch.softmax((qh[i] @ k[0, h, : i + 1].T) * 0.3, -1)
                s[: i + 1] += p
        s = torch.nn.functional.avg_pool1d(s[None, None], 3, 1, 1)[0, 0]
        s[T - w :] = float("inf")
        s[0] = float("inf")
        want = torch.topk(s, 20).indices.sort().values
        assert layer.pos[h].long().tolist() == want.tolist()


def test_h2o_accumulated_scores_equal_column_sums():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 1, 40, 8, generator=g), torch.randn(1, 1, 40, 8)
    layer = make_policy("h2o", 1.0).layer(0)  # budget 1: nothing evicted, scores still tracked
    layer.policy.budget = 0.999  # compress runs, keeps all 40 (ceil)

    def exact(qq, kk, vv):
        out, lse = dense_attention(qq, kk, vv, causal=True, scale=0.35)
        return attnsieve.methods.AttnOutput(out, 0, lse=lse)

    layer.attend(q, k, v, None, 0.35, exact)
    full = torch.softmax(
        (q[0] @ k[0, 0].T * 0.35).masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), float("-inf")), -1
    )
    assert_close(layer.acc[0], full.sum(dim=(0, 1)), atol=1e-5, rtol=1e-5)


def test_adakv_gives_heads_different_lengths_stored_as_separate_tensors():
    g = torch.Generator().manual_seed(3)
    B, H, Hkv, T, D = 1, 2, 2, 120, 16
    q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D)
    k[0, 0, 40] *= 0  # head 0: one planted key takes all the attention of the window
    q[0, 0] = 0
    q[0, 0, :, 0] = 30.0
    k[0, 0, 40, 0] = 30.0
    layer = make_policy("adakv", 0.25, kv_window=4, kv_kernel=1).layer(0)

    def exact(qq, kk, vv):
        out, lse = dense_attention(qq, kk, vv, causal=True)
        return attnsieve.methods.AttnOutput(out, 0, lse=lse)

    layer.attend(q, k, v, None, D**-0.5, exact)
    n0, n1 = layer.pos[0].numel(), layer.pos[1].numel()
    assert n0 + n1 == 2 * 30 and n0 != n1
    assert layer.keys[0].shape[0] == n0 and layer.keys[1].shape[0] == n1
    assert 40 in layer.pos[0].tolist()


def test_pyramid_budgets_shrink_with_depth_and_average_the_budget():
    n = [layer_budget(4000, 0.2, 32, 20.0, 10, i) for i in range(10)]
    assert n == sorted(n, reverse=True) and n[0] > n[-1]
    assert sum(n) / 10 == pytest.approx(0.2 * 4000, abs=1)
    assert n[-1] == round(0.2 * 4000 / 20)  # the top layer: avg / beta
    # kvpress's fallback: the smallest budget would be under one window -> uniform SnapKV
    assert layer_budget(4096, 0.1, 32, 20.0, 18, 17) is None


def observe(layer, T, D=16, seed=4):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(1, 2, T, D, generator=g), torch.randn(1, 1, T, D, generator=g), torch.randn(1, 1, T, D)

    def exact(qq, kk, vv):
        out, lse = dense_attention(qq, kk, vv, causal=True)
        return attnsieve.methods.AttnOutput(out, 0, lse=lse)

    layer.attend(q, k, v, None, D**-0.5, exact)
    return layer.pos[0].tolist()


@pytest.mark.parametrize("T,beta", [(4096, 20.0), (1000, 2.0)], ids=["fallback", "pyramid"])
def test_pyramid_keeps_the_first_token_and_the_window_in_every_layer_at_budget_0_1(T, beta):
    """At kv_budget 0.1 on 18 layers the top layer's share is smaller than its window (fallback to
    uniform SnapKV), or, with beta 2, the window and sinks come on top of the layer's share."""
    policy = make_policy("pyramidkv", 0.1, n_layers=18, kv_beta=beta)
    for rank in (0, 17):
        kept = observe(policy.layer(rank, rank), T)
        assert 0 in kept and set(range(T - 32, T)) <= set(kept), rank
        n = layer_budget(T, 0.1, 32, beta, 18, rank)
        assert len(kept) == (math.ceil(0.1 * T) if n is None else n + 32 + 4), rank
    assert (layer_budget(T, 0.1, 32, beta, 18, 17) is None) == (beta == 20.0)


def test_chunked_prefill_keeps_kv_memory_near_the_budget_and_is_exact_at_budget_one():
    model = tiny_llama()
    ids, _ = prompt(T=240)
    full = model(ids).logits[:, -1]
    with attnsieve.patched(model, "dense", kv="snapkv", kv_budget=1.0) as p:
        cache = p.new_cache()
        for s in range(0, 240, 60):
            out = model(ids[:, s : s + 60], cache=cache, use_cache=True)
    assert_close(out.logits[:, -1], full, atol=1e-4, rtol=1e-4)
    peak = 0
    with attnsieve.patched(model, "dense", kv="snapkv", kv_budget=0.25) as p:
        cache = p.new_cache()
        for s in range(0, 240, 60):
            model(ids[:, s : s + 60], cache=cache, use_cache=True)
            peak = max(peak, cache.nbytes())
    assert cache.get_seq_length() == 240
    assert peak <= 0.3 * cache.dense_nbytes()


def test_policy_errors_are_clear():
    model = tiny_llama()
    with pytest.raises(ValueError, match="need a KV-cache policy"):
        attnsieve.patch(model, "dense", kv_budget=0.5)
    with pytest.raises(ValueError, match="unknown KV-cache policy 'nope'"):
        attnsieve.patch(model, "dense", kv="nope")
    with pytest.raises(ValueError, match=r"kv_budget must be in \(0, 1\], got 1.5"):
        attnsieve.patch(model, "dense", kv="snapkv", kv_budget=1.5)
    with pytest.raises(ValueError, match="unknown parameter"):
        attnsieve.patch(model, "dense", kv="snapkv", kv_bits=4)
    with pytest.raises(ValueError, match="kv_window must be >= 1"):
        attnsieve.patch(model, "dense", kv="snapkv", kv_window=0)
    assert model.config._attn_implementation == "sdpa"  # nothing left patched


def test_sparse_prefill_method_combines_with_a_policy():
    model = tiny_gemma3()
    ids, _ = prompt(T=200)
    with attnsieve.patched(model, "block-topk", density=0.3, block_size=16, kv="snapkv", kv_budget=0.3) as p:
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 205)
    assert p.stats.density("prefill") < 0.6
    assert p.stats.density("decode") is not None


def test_layer_kv_base_class_keeps_everything():
    layer = LayerKV(0)
    k = torch.randn(1, 1, 10, 4)
    layer.attend(k, k, k, None, 0.5, lambda q, kk, vv: attnsieve.methods.AttnOutput(*dense_attention(q, kk, vv)[:1], 0,
                                                                                    lse=dense_attention(q, kk, vv)[1]))
    assert layer.pos[0].tolist() == list(range(10))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packed_codes_round_trip(bits):
    from attnsieve.cache._quant import pack, unpack

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 37), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == -(-37 * bits // 8)
    assert torch.equal(unpack(packed, bits, 37), codes)


@pytest.mark.parametrize("name", QUANTISING)
def test_quantising_policies_at_8_bits_agree_with_dense_and_shrink_memory(name):
    model = tiny_llama()
    ids, _ = prompt(T=300)
    ref = model.generate(ids, max_new_tokens=64, do_sample=False)
    errors = {}
    for bits in (8, 4, 2):
        with attnsieve.patched(model, "dense", kv=name, kv_bits=bits, kv_residual=32):
            out = model.generate(ids, max_new_tokens=64, do_sample=False, return_dict_in_generate=True)
        cache = out.cache
        errors[bits] = max(layer.kv.reconstruction_error() for layer in cache.layers)
        if bits == 8:
            assert (out.sequences[0, 300:] == ref[0, 300:]).float().mean() >= 0.95
        assert cache.nbytes() < (0.5 if bits < 8 else 0.6) * cache.dense_nbytes()
        stored = sum(int(n.sum()) for n in cache.stored_tokens().values())
        assert stored == 363 * len(cache.layers) * 2  # nothing evicted; the last token is never fed back
    assert errors[8] < errors[4] < errors[2] < 0.5


@pytest.mark.parametrize("name", [n for n in POLICIES if policy_class(n).kind == "selection"])
def test_selection_policies_read_about_their_budget_and_evict_nothing(name):
    model = tiny_llama()
    ids, _ = prompt(T=320)
    with attnsieve.patched(model, "dense", kv=name, kv_budget=0.25) as p:
        out = model.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert all(int(n.sum()) == 2 * 331 for n in out.cache.stored_tokens().values())  # everything kept
    assert 0.2 <= p.stats.density("decode") <= 0.45


def test_quest_step_equals_attention_over_each_heads_top_pages():
    g = torch.Generator().manual_seed(5)
    H, T, D, P = 2, 70, 8, 16
    q, k, v = torch.randn(1, H, T + 1, D, generator=g), torch.randn(1, 1, T + 1, D, generator=g), torch.randn(
        1, 1, T + 1, D, generator=g
    )
    layer = make_policy("quest", 0.5, kv_page=P).layer(0)

    def exact(qq, kk, vv):
        out, lse = dense_attention(qq, kk, vv, causal=True, scale=0.3)
        return attnsieve.methods.AttnOutput(out, 0, lse=lse)

    layer.attend(q[:, :, :T], k[:, :, :T], v[:, :, :T], None, 0.3, exact)
    out, _ = layer.attend(q[:, :, T:], k[:, :, T:], v[:, :, T:], None, 0.3, exact)
    for h in range(H):
        qh = q[0, h, T]
        kp = k[0, 0, : 64].view(4, P, D)
        bound = (torch.maximum(qh * kp.amin(1), qh * kp.amax(1))).sum(-1)
        pages = bound.topk(math.ceil(0.5 * T / P) - 1).indices
        keep = torch.zeros(T + 1, dtype=torch.bool)
        for pg in pages.tolist():
            keep[pg * P : (pg + 1) * P] = True
        keep[64:] = True  # the partial page and the new token
        s = (k[0, 0][keep] @ qh) * 0.3
        ref = torch.softmax(s, -1) @ v[0, 0][keep]
        assert_close(out[0, h, 0], ref)


@pytest.mark.parametrize("kv", ["streaming", "snapkv"])
@pytest.mark.parametrize("arch", MODELS)
def test_unpatch_during_generate_refuses_rather_than_decode_wrongly(kv, arch):
    """A policy cache holds a compressed past stock attention cannot read: unpatching mid-generate
    (here from a logits processor at step 3) makes the next step raise, instead of silently running
    stock SDPA over the current token alone; unpatching after generate is as before."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model = MODELS[arch]()
    ids, _ = prompt(T=40)

    class UnpatchAtStep3(LogitsProcessor):
        steps = 0

        def __call__(self, input_ids, scores):
            UnpatchAtStep3.steps += 1
            if UnpatchAtStep3.steps == 3:
                attnsieve.unpatch(model)
            return scores

    attnsieve.patch(model, "dense", kv=kv, kv_budget=0.1)
    unpatching = LogitsProcessorList([UnpatchAtStep3()])
    with pytest.raises(RuntimeError, match=r"unpatch\(\) was called while this KV-policy cache was in use"):
        model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, logits_processor=unpatching)
    assert UnpatchAtStep3.steps == 3  # refused at the first step after the unpatch
    assert getattr(model, "_attnsieve_patch", None) is None
    with attnsieve.patched(model, "dense", kv=kv, kv_budget=0.1):  # a fresh patch generates as before
        first = model.generate(ids, max_new_tokens=10, do_sample=False)
    with attnsieve.patched(model, "dense", kv=kv, kv_budget=0.1):
        assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), first)


@pytest.mark.parametrize("budget", [1.0, 0.25])
def test_bench_decode_interleaves_and_reports_attention_time(budget, tmp_path):
    """bench decode on a tiny Gemma-3 (sliding and global layers): both caches decode the same steps in
    alternating blocks; at budget 1 the policy's tokens are DynamicCache's; the attention fields are
    there and the global layers are the ones the policy compresses."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    from attnsieve.eval.bench import bench_decode

    from tiny_models import save_tiny_eval_model

    folder = save_tiny_eval_model(tmp_path / "m")
    model, tok = Gemma3ForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    r = bench_decode(model, tok, "snapkv", budget, 300, steps=6, rounds=3, params={"kv_window": 8})
    assert r["rounds"] == 3 and r["steps"] == 6
    layers = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    sliding = [getattr(m, "sliding_window", None) for m in layers]
    assert r["global_layers"] == [i for i, w in enumerate(sliding) if not w]
    for key in ("ms", "dense_ms", "attn_ms", "dense_attn_ms", "global_attn_ms", "dense_global_attn_ms"):
        assert r[key] > 0, key
    assert r["attn_ms"] < r["ms"] and r["global_attn_ms"] <= r["attn_ms"]
    if budget == 1.0:
        assert r["token_agreement"] == 1.0 and r["decode_density"] == 1.0
    else:
        assert r["bytes_compressed_layers"] < 0.5 * r["dense_bytes_compressed_layers"]
    assert not hasattr(model, attnsieve.integrations.hf._STATE)  # left unpatched


@pytest.mark.parametrize("kv", ["snapkv", "tova", "keydiff", "kvzip"])
def test_query_agnostic_cache_does_not_depend_on_the_question(kv):
    """compress_context: the policy compresses the context alone and the cache is frozen, so two
    different questions appended to it leave the context's kept tokens identical, and the questions'
    own tokens are all stored (no recompression)."""
    model = tiny_llama()
    ctx, _ = prompt(T=160, seed=3)
    qa, _ = prompt(T=12, seed=4)
    qb, _ = prompt(T=12, seed=5)
    with attnsieve.patched(model, "dense", kv=kv, kv_budget=0.25, **extra(kv)) as p:
        kept = []
        for q in (qa, qb):
            cache = p.compress_context(ctx)
            before = [[r.clone() for r in layer.kv.pos] for layer in cache.layers]
            keys = [[r.clone() for r in layer.kv.keys] for layer in cache.layers]
            model(q, cache=cache, use_cache=True)
            for layer, pos0, keys0 in zip(cache.layers, before, keys, strict=True):
                for row, p0, k0 in zip(range(len(pos0)), pos0, keys0, strict=True):
                    n = p0.numel()
                    assert torch.equal(layer.kv.pos[row][:n], p0) and torch.equal(layer.kv.keys[row][:n], k0)
                    assert layer.kv.pos[row][n:].tolist() == list(range(160, 172))  # the question, whole
            kept.append(before)
        assert all(torch.equal(a, b) for la, lb in zip(*kept, strict=True) for a, b in zip(la, lb, strict=True))
        lengths = [r.numel() for layer in kept[0] for r in layer]
        if kv == "kvzip":  # one budget for the whole cache, shared unevenly
            assert sum(lengths) == len(lengths) * math.ceil(0.25 * 160)
        else:
            assert max(lengths) <= math.ceil(0.25 * 160)
    with attnsieve.patched(model, "dense") as p, pytest.raises(ValueError, match="needs a KV-cache policy"):
        p.compress_context(ctx)

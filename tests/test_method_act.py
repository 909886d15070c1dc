"""ACT: the reference's sink rule and redistribution against a loop, planted hidden sinks, head choice."""

from __future__ import annotations

import json

import pytest
import torch

from attnsieve.kernels import dense_attention
from attnsieve.methods import make
from attnsieve.methods.act import calibrate_rows, drop_first, load_act_heads
from attnsieve.methods.base import LayerContext

from helpers import assert_close


def naive_act(q, k, v, scale, beta, threshold, heads, causal=False):
    """GATECH-EIC/ACT `models/llama_modelling_aug.py`, `atten_process_eval`, per head on the full T x T map:
    sink columns = column sum / (T - j) > threshold, the first one dropped; sink probabilities x beta;
    the removed mass handed to the row's other keys in proportion to their probabilities. causal=True:
    the same with each row's statistics over rows up to itself."""
    B, H, T, _ = q.shape
    G = H // k.shape[1]
    out = dense_attention(q, k, v, causal=True, scale=scale)[0].double()
    for h in heads:
        kk, vv = k[0, h // G].double(), v[0, h // G].double()
        P = torch.zeros(T, T, dtype=torch.float64)
        for i in range(T):
            P[i, : i + 1] = torch.softmax(q[0, h, i].double() @ kk[: i + 1].T * scale, -1)
        for i in range(T):
            rows = P[: i + 1] if causal else P
            counts = (torch.arange(T).flip(0) if not causal else (i + 1 - torch.arange(T)).clamp_min(0)).double()
            mean = rows.sum(0) / counts.clamp_min(1)
            idx = [j for j in range(T) if mean[j] > threshold and counts[j] > 0]
            sinks = [j for j in idx[1:] if j <= i]
            row = P[i].clone()
            if sinks:
                others = [j for j in range(i + 1) if j not in sinks]
                rest = row[others].sum()
                if rest > 0:
                    moved = row[sinks].sum() * (1 - beta)
                    new = row.clone()
                    new[sinks] *= beta
                    new[others] += moved * row[others] / rest
                    row = new
            out[0, h, i] = row @ vv
    return out


def planted(T=60, H=4, Hkv=2, D=16, seed=0):
    """Keys 0, 9 and 30 point where every query points: an initial sink and two hidden ones."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, T, D, generator=g) * 0.3
    k = torch.randn(1, Hkv, T, D, generator=g) * 0.3
    v = torch.randn(1, Hkv, T, D, generator=g)
    q[..., 0] += 2.0
    k[:, :, [0, 9, 30], 0] = 3.0
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
def test_act_equals_the_reference_rule_on_planted_sinks(causal):
    q, k, v = planted()
    got = make("act", causal=causal).prefill(q, k, v, LayerContext(0, 0.25))
    want = naive_act(q, k, v, 0.25, 0.4, 0.1, range(4), causal=causal)
    assert_close(got.out.double(), want, atol=1e-5, rtol=1e-4)
    dense = dense_attention(q, k, v, causal=True, scale=0.25)[0]
    assert (got.out - dense).abs().max() > 1e-2  # the hidden sinks really were scaled down


def test_only_the_chosen_heads_change_and_cells_count_the_extra_passes():
    q, k, v = planted()
    ctx = LayerContext(3, 0.25)
    dense = dense_attention(q, k, v, causal=True, scale=0.25)[0]
    res = make("act", heads={3: [1]}).prefill(q, k, v, ctx)
    assert torch.equal(res.out[:, [0, 2, 3]], dense[:, [0, 2, 3]].to(res.out.dtype)) or torch.allclose(
        res.out[:, [0, 2, 3]], dense[:, [0, 2, 3]], atol=1e-6)
    assert (res.out[:, 1] - dense[:, 1]).abs().max() > 1e-2
    exact = 4 * 60 * 61 // 2
    assert res.cells == exact + 2 * exact // 4
    assert torch.allclose(make("act", heads={5: [1]}).prefill(q, k, v, ctx).out, dense, atol=1e-6)  # other layer


def test_rows_redistribute_mass_and_first_sink_is_dropped():
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1]])
    sink = drop_first(torch.tensor([[True, True, False, False]]))
    assert sink.tolist() == [[False, True, False, False]]
    got = calibrate_rows(p, sink, 0.4)
    assert_close(got, torch.tensor([[0.5 + 0.12 * 0.5 / 0.8, 0.08, 0.2 + 0.12 * 0.2 / 0.8, 0.1 + 0.12 * 0.1 / 0.8]]))
    assert got.sum() == pytest.approx(1.0)
    assert torch.equal(calibrate_rows(p, torch.ones_like(sink), 0.4), p)  # all sinks: nothing to move to


def test_heads_load_from_a_dict_or_a_file_and_errors_are_clear(tmp_path):
    f = tmp_path / "act.json"
    f.write_text(json.dumps({"heads": {"2": [0, 3]}}))
    assert load_act_heads(str(f)) == {2: {0, 3}} == load_act_heads({2: [0, 3]})
    for bad, msg in [({"beta": 1.5}, "beta"), ({"threshold": 0}, "threshold")]:
        with pytest.raises(ValueError, match=msg):
            make("act", **bad)
    with pytest.raises(TypeError, match="heads"):
        make("act", heads=3)
    with pytest.raises(ValueError, match="does not exist"):
        make("act", heads=str(tmp_path / "none.json"))
    with pytest.raises(ValueError, match="calibrate_act"):
        make("act", heads="no-such-model-anywhere")


def test_head_search_on_a_tiny_model_keeps_the_heads_that_gain_and_is_cached(tmp_path, monkeypatch):
    from test_cache_duo import CharTok

    from attnsieve.signals import calibrate_act

    from tiny_models import tiny_llama_retrieval

    monkeypatch.setenv("ATTNSIEVE_CACHE", str(tmp_path))
    model, tok = tiny_llama_retrieval(n_layers=4), CharTok()
    doc = calibrate_act(model, tok, length=400, samples=2, haystack="repeat", name="tiny-act", progress=False)
    assert sorted(doc["gains"]) == ["2"] and len(doc["gains"]["2"]) == model.config.num_attention_heads
    assert doc["heads"] == {li: [h for h, g in enumerate(row) if g > 0] for li, row in doc["gains"].items()
                            if any(g > 0 for g in row)}
    monkeypatch.setattr("attnsieve.signals.sinks._answer_logprob", lambda *a: pytest.fail("cached: no run"))
    assert calibrate_act(model, tok, length=400, samples=2, haystack="repeat", name="tiny-act") == doc
    method = make("act", heads="tiny-act")  # found again by model name
    assert method.heads_for(2, 6) == sorted(int(h) for h in doc["heads"].get("2", []))
    assert method.heads_for(0, 6) == []


def test_a_planted_sink_head_keeps_exactly_beta_of_the_sinks_attention_and_rows_sum_to_one():
    """Head 2 alone has a hidden sink at key 9 (keys 0 and 9 match its queries); values are one-hot per key, so
    the output rows are the attention rows themselves. ACT (heads=None: it must find the sink by itself)
    scales key 9's attention in head 2 by exactly beta, leaves the initial sink and the other heads alone,
    and every row still sums to one."""
    T, H, D, beta = 48, 4, 8, 0.4
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, H, T, D, generator=g) * 0.2
    k = torch.randn(1, H, T, D, generator=g) * 0.2  # one KV head per query head
    q[:, 2, :, 0] = 2.0
    k[:, 2, [0, 9], 0] = 3.0
    v = torch.eye(T).expand(1, H, T, T).contiguous()  # out[i] = the attention row of query i
    ctx = LayerContext(0, 0.5)
    dense = dense_attention(q, k, v, causal=True, scale=0.5)[0]
    act = make("act", beta=beta).prefill(q, k, v, ctx).out
    assert_close(act[0, [0, 1, 3]], dense[0, [0, 1, 3]], atol=1e-6, rtol=1e-5)  # no sink found there
    rows = torch.arange(10, T)  # queries that see key 9
    assert_close(act[0, 2, rows, 9], beta * dense[0, 2, rows, 9], atol=1e-6, rtol=1e-5)
    assert (dense[0, 2, rows, 9] > 0.2).all()  # a real sink, not a rounding
    assert_close(act[0, 2].sum(-1), torch.ones(T), atol=1e-5, rtol=1e-5)
    for i in (10, 25, T - 1):  # the rest of each row scaled up in proportion
        seen = [j for j in range(i + 1) if j != 9]
        gain = act[0, 2, i, seen] / dense[0, 2, i, seen]
        assert_close(gain, gain[:1].expand_as(gain), atol=1e-4, rtol=1e-4)

"""ZipVL's dynamic ratio: the mass rule, normalised probe scores against a loop, a planted layer, the cap."""

from __future__ import annotations

import math

import pytest
import torch

import attnsieve
from attnsieve.cache import make_policy
from attnsieve.cache.zipvl import tokens_for_mass
from attnsieve.kernels import dense_attention

from tiny_models import tiny_llama


def exact(q, k, v):
    out, lse = dense_attention(q, k, v, causal=True, scale=0.5)
    return attnsieve.methods.AttnOutput(out, 0, lse=lse)


def test_tokens_for_mass_counts_the_fewest_tokens_reaching_the_share():
    s = torch.tensor([0.1, 0.5, 0.1, 0.3])
    assert [tokens_for_mass(s, t) for t in (0.4, 0.75, 0.85, 0.95, 1.0)] == [1, 2, 3, 4, 4]
    assert tokens_for_mass(torch.zeros(5), 0.5) == 5  # no attention at all: nothing to rank, keep all


def naive_normalised_scores(q, k, probes, scale):
    """ZipCache/ZipVL normalised attention, one probe at a time: softmax over the keys it sees, summed over
    probes and heads, divided by (probes that see the token) x heads."""
    G, T, _ = q.shape
    acc, seen = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    for g in range(G):
        for i in probes:
            p = torch.softmax(q[g, i].double() @ k[: i + 1].double().T * scale, -1)
            acc[: i + 1] += p
            seen[: i + 1] += 1
    return acc / seen.clamp_min(1)


@pytest.mark.parametrize("tau", [0.5, 0.9])
def test_selection_equals_a_naive_loop(tau):
    g = torch.Generator().manual_seed(0)
    T, D = 64, 8
    q, k = torch.randn(1, 2, T, D, generator=g) * 2, torch.randn(1, 1, T, D, generator=g) * 2
    layer = make_policy("zipvl", kv_tau=tau, kv_probe_ratio=1.0, kv_sink=2).layer(0)
    layer.attend(q, k, k, None, 0.5, exact)
    score = naive_normalised_scores(q[0], k[0, 0], range(T), 0.5)
    order = score.argsort(descending=True)
    n = int((score[order].cumsum(0) < tau * score.sum()).sum()) + 1
    want = set(order[:n].tolist()) | {0, 1}
    assert set(layer.pos[0].tolist()) == want
    assert 2 < len(want) < T


def test_a_concentrated_layer_keeps_its_planted_tokens_and_a_diffuse_one_keeps_many():
    T, D = 48, 4
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, 1, T, D, generator=g) * 0.01
    k[0, 0, [7, 20, 33], 0] = 10.0  # three keys every query points at
    q = torch.zeros(1, 2, T, D)
    q[..., 0] = 3.0
    layer = make_policy("zipvl", kv_tau=0.8, kv_probe_ratio=1.0, kv_sink=1).layer(0)
    layer.attend(q, k, k, None, 0.5, exact)
    assert layer.pos[0].tolist() == [0, 7, 20, 33]
    flat = make_policy("zipvl", kv_tau=0.8, kv_probe_ratio=1.0, kv_sink=1).layer(1)
    flat.attend(torch.zeros(1, 2, T, D), k * 0, k * 0, None, 0.5, exact)  # uniform attention
    assert flat.pos[0].numel() > 0.5 * T


def test_budget_caps_every_layer_and_heads_share_one_token_set():
    model = tiny_llama()
    ids = torch.randint(3, 97, (1, 160), generator=torch.Generator().manual_seed(2))
    with attnsieve.patched(model, "dense", kv="zipvl", kv_budget=0.2):
        cache = model(ids, use_cache=True).cache
    for layer in cache.layers:
        rows = layer.kv.pos
        assert all(torch.equal(r, rows[0]) for r in rows)  # one token set per layer
        assert rows[0].numel() <= math.ceil(0.2 * 160)
        assert rows[0][:4].tolist() == [0, 1, 2, 3]
    with attnsieve.patched(model, "dense", kv="zipvl", kv_tau=0.5):  # no cap: the threshold alone decides
        cache = model(ids, use_cache=True).cache
    kept = [layer.kv.pos[0].numel() for layer in cache.layers]
    assert all(4 <= n < 160 for n in kept)


def test_zipvl_errors_are_clear():
    for bad, msg in [({"kv_tau": 0.0}, "kv_tau must be in"), ({"kv_tau": 1.5}, "kv_tau must be in"),
                     ({"kv_probe_ratio": 0.0}, "kv_probe_ratio")]:
        with pytest.raises(ValueError, match=msg):
            make_policy("zipvl", 0.5, **bad)

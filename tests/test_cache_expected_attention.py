"""Expected Attention: scores against a naive loop of kvpress's scoring, a planted case, errors, RoPE plumbing."""

from __future__ import annotations

import math

import pytest
import torch

import attnsieve
from attnsieve.cache import Rotary, make_policy
from attnsieve.cache.expected_attention import ExpectedAttentionLayer, unrotate
from attnsieve.kernels import dense_attention

from helpers import assert_close
from tiny_models import tiny_gemma3, tiny_llama


def exact(scale):
    def run(qq, kk, vv):
        out, lse = dense_attention(qq, kk, vv, causal=True, scale=scale)
        return attnsieve.methods.AttnOutput(out, 0, lse=lse)

    return run


def rope(x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """transformers' rotate-half RoPE on the first 2 * len(inv_freq) dims of x [..., T, D]."""
    R = 2 * inv_freq.numel()
    ang = positions.float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    r = x[..., :R]
    half = torch.cat([-r[..., R // 2 :], r[..., : R // 2]], -1)
    return torch.cat([r * cos + half * sin, x[..., R:]], -1)


def naive_expected_attention(q_pre, k, v, inv_freq, n_sink, n_future, use_covariance, use_vnorm, epsilon):
    """kvpress `kvpress/presses/expected_attention_press.py`, `ExpectedAttentionPress.score`, as loops.

    q_pre [H, T, D] pre-RoPE queries of one prompt, k/v [Hkv, T, D] stored (post-RoPE) keys and values.
    Statistics of the queries after the first n_sink; RoPE matrices R_t = cos I + sin P averaged over
    t in [T, T + n_future); per query head exp(mu.k / sqrt(d) + k^T Sigma k / 2d) normalised over the
    non-sink keys, averaged over the group, (a + epsilon) * ||v||; sinks scored +inf (kept).
    """
    H, T, D = q_pre.shape
    Hkv = k.shape[0]
    G = H // Hkv
    q_pre, k, v = q_pre.double(), k.double(), v.double()
    R = torch.zeros(D, D, dtype=torch.float64)
    half = D // 2
    for t in range(T, T + n_future):
        Rt = torch.zeros(D, D, dtype=torch.float64)
        for i in range(D):
            theta = t * float(inv_freq[i % half])
            Rt[i, i] = math.cos(theta)
            if i < half:
                Rt[i, i + half] = -math.sin(theta)
            else:
                Rt[i, i - half] = math.sin(theta)
        R += Rt / n_future
    out = torch.full((Hkv, T), math.inf, dtype=torch.float64)
    for h in range(Hkv):
        acc = torch.zeros(T - n_sink, dtype=torch.float64)
        for g in range(G):
            qs = q_pre[h * G + g, n_sink:]
            n = qs.shape[0]
            mu = [sum(float(qs[s, i]) for s in range(n)) / n for i in range(D)]
            cov = [
                [sum((float(qs[s, i]) - mu[i]) * (float(qs[s, j]) - mu[j]) for s in range(n)) / n for j in range(D)]
                for i in range(D)
            ]
            mu_f = [sum(float(R[i, a]) * mu[a] for a in range(D)) for i in range(D)]
            cov_f = [
                [sum(float(R[i, a]) * cov[a][c] * float(R[j, c]) for a in range(D) for c in range(D)) for j in range(D)]
                for i in range(D)
            ]
            z = []
            for j in range(n_sink, T):
                kj = [float(x) for x in k[h, j]]
                e = sum(mu_f[i] * kj[i] for i in range(D)) / math.sqrt(D)
                if use_covariance:
                    e += sum(kj[i] * cov_f[i][c] * kj[c] for i in range(D) for c in range(D)) / D / 2
                z.append(e)
            m = max(z)
            w = [math.exp(x - m) for x in z]
            acc += torch.tensor([x / sum(w) for x in w], dtype=torch.float64) / G
        if use_vnorm:
            acc = torch.tensor([(float(acc[j]) + epsilon) * float(v[h, n_sink + j].norm()) for j in range(T - n_sink)])
        out[h, n_sink:] = acc
    return out


@pytest.mark.parametrize(
    "use_covariance,use_vnorm,epsilon",
    [(True, True, 0.0), (False, True, 0.05), (True, False, 0.0)],
    ids=["reference-defaults", "mean-only-eps", "no-vnorm"],
)
def test_scores_equal_a_naive_loop_of_the_reference(use_covariance, use_vnorm, epsilon):
    g = torch.Generator().manual_seed(3)
    H, Hkv, T, D, n_sink, n_future = 4, 2, 23, 8, 3, 7
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, D, 2).float() / D))
    pos = torch.arange(T)
    q_pre = torch.randn(1, H, T, D, generator=g)
    k, v = torch.randn(1, Hkv, T, D, generator=g), torch.randn(1, Hkv, T, D, generator=g)
    scale = D**-0.5  # the reference's 1/sqrt(d)
    params = dict(
        kv_sink=n_sink,
        kv_n_future_positions=n_future,
        kv_use_covariance=use_covariance,
        kv_use_vnorm=use_vnorm,
        kv_epsilon=epsilon,
    )
    layer = make_policy("expected-attention", 1.0, **params).layer(0)  # budget 1: stores everything
    layer.rotary = Rotary(inv_freq, pos[None])
    q = rope(q_pre, inv_freq, pos)  # the layer sees post-RoPE queries, as in a model
    layer.attend(q, k, v, None, scale, exact(scale))
    got = layer.token_scores(q, k, None, scale)
    want = naive_expected_attention(
        q_pre[0], k[0], v[0], inv_freq, n_sink, n_future, use_covariance, use_vnorm, epsilon
    )
    for h in range(Hkv):
        assert_close(got[h].double(), want[h], atol=1e-6, rtol=1e-4, what=f"head {h}")

    evicting = make_policy("expected-attention", 0.5, **params).layer(0)
    evicting.rotary = Rotary(inv_freq, pos[None])
    evicting.attend(q, k, v, None, scale, exact(scale))
    for h in range(Hkv):
        assert evicting.pos[h].tolist() == torch.topk(want[h], math.ceil(0.5 * T)).indices.sort().values.tolist()


def test_padded_rows_score_as_the_same_prompt_alone():
    g = torch.Generator().manual_seed(5)
    H, Hkv, T, D, pad = 2, 1, 20, 8, 6
    inv_freq = 1.0 / (50.0 ** (torch.arange(0, D, 2).float() / D))
    q_pre, k, v = (
        torch.randn(1, H, T, D, generator=g),
        torch.randn(1, Hkv, T, D, generator=g),
        torch.randn(1, Hkv, T, D, generator=g),
    )
    alone = make_policy("expected-attention", 1.0, kv_n_future_positions=9).layer(0)
    alone.rotary = Rotary(inv_freq, torch.arange(T)[None])
    q = rope(q_pre, inv_freq, torch.arange(T))
    alone.attend(q, k, v, None, 0.3, exact(0.3))

    Tp = T + pad

    def padded(x, left):  # [1, h, T, D] -> [1, h, T + pad, D], junk on one side
        junk = torch.randn(1, x.shape[1], pad, D, generator=g)
        return torch.cat([junk, x] if left else [x, junk], 2)

    qb, kb, vb = (torch.cat([padded(x, False), padded(x, True)]) for x in (q, k, v))
    valid = torch.ones(2, Tp, dtype=torch.bool)
    valid[0, T:], valid[1, :pad] = False, False  # row 0: the prompt then padding; row 1: left padding
    positions = torch.stack([torch.arange(Tp), (torch.arange(Tp) - pad).clamp_min(0)])  # as generate gives them
    batch = make_policy("expected-attention", 1.0, kv_n_future_positions=9).layer(0)
    batch.rotary = Rotary(inv_freq, positions)
    batch.attend(qb, kb, vb, valid, 0.3, exact(0.3))
    want = alone.token_scores(q, k, None, 0.3)[0]
    got = batch.token_scores(qb, kb, valid, 0.3)
    assert_close(got[0], want, atol=1e-6, rtol=1e-4, what="right-padded row")
    assert_close(got[1], want, atol=1e-6, rtol=1e-4, what="left-padded row")


@pytest.mark.parametrize("use_covariance,kept", [(True, [0, 1, 2, 3, 11, 17]), (False, [0, 1, 2, 3, 11, 30])])
def test_planted_keys_aligned_with_the_future_queries_are_kept(use_covariance, kept):
    # Dims 0 and 1 form the one rotating pair (omega * T = pi/2: the next position turns e0 into e1);
    # dims 2-7 do not rotate. Every query is e0 + 0.75 e6 before RoPE, plus +-2 e4 alternating
    # (mean 0, variance 4). The future query is e1 + 0.75 e6, so key 11 (4 e1) scores 4s, key 30
    # (4 e6) 3s, key 17 (4 e4) 0 from the mean but s^2/2 * 16 * 4 = 4 from the covariance; key 22
    # (4 e0, what the prompt's early queries looked like) is orthogonal to the future query.
    T, D, H = 40, 8, 2
    inv_freq = torch.tensor([math.pi / 2 / T])
    pos = torch.arange(T)
    g = torch.Generator().manual_seed(0)
    q_pre = torch.zeros(1, H, T, D)
    q_pre[..., 0], q_pre[..., 6] = 1.0, 0.75
    q_pre[..., 4] = torch.tensor([2.0, -2.0]).repeat(T // 2)
    k = 0.1 * torch.randn(1, 1, T, D, generator=g)
    for t, dim in [(11, 1), (30, 6), (17, 4), (22, 0)]:
        k[0, 0, t] = 0
        k[0, 0, t, dim] = 4.0
    v = torch.nn.functional.normalize(torch.randn(1, 1, T, D, generator=g), dim=-1)  # ||v|| = 1: no say
    layer = make_policy("expected-attention", 6 / T, kv_n_future_positions=1, kv_use_covariance=use_covariance).layer(0)
    layer.rotary = Rotary(inv_freq, pos[None])
    layer.attend(rope(q_pre, inv_freq, pos), k, v, None, D**-0.5, exact(D**-0.5))
    assert layer.pos[0].tolist() == kept


def test_parameter_errors_name_the_value_and_range():
    with pytest.raises(ValueError, match="kv_n_future_positions must be >= 1, got 0"):
        make_policy("expected-attention", 0.5, kv_n_future_positions=0)
    with pytest.raises(ValueError, match=r"kv_epsilon must be a finite number >= 0, got -0.1"):
        make_policy("expected-attention", 0.5, kv_epsilon=-0.1)
    with pytest.raises(ValueError, match="kv_epsilon must be a finite number >= 0, got nan"):
        make_policy("expected-attention", 0.5, kv_epsilon=float("nan"))
    with pytest.raises(ValueError, match="kv_sink must be >= 0, got -1"):
        make_policy("expected-attention", 0.5, kv_sink=-1)
    with pytest.raises(TypeError, match="kv_use_vnorm must be a bool"):
        make_policy("expected-attention", 0.5, kv_use_vnorm="yes")
    with pytest.raises(TypeError, match="kv_n_future_positions must be an int"):
        make_policy("expected-attention", 0.5, kv_n_future_positions=2.5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_integration_gives_the_rotary_that_recovers_the_pre_rope_queries(arch, monkeypatch):
    model = tiny_llama() if arch == "llama" else tiny_gemma3()
    attn = {m.layer_idx: m for m in model.modules() if type(m).__name__.endswith("Attention")}
    idx = max(i for i, m in attn.items() if getattr(m, "sliding_window", None) is None)  # a global layer
    module, hidden = attn[idx], {}

    def keep_hidden(mod, args, kwargs):
        hidden.setdefault("h", kwargs["hidden_states"])  # the prefill's (normed) input to the layer

    module.register_forward_pre_hook(keep_hidden, with_kwargs=True)
    seen = {}
    original = ExpectedAttentionLayer.token_scores

    def spy(self, q, k_new, new_valid, scale):
        if self.layer_idx == idx and "q" not in seen:
            seen.update(q=q, rotary=self.rotary, valid=new_valid)
        return original(self, q, k_new, new_valid, scale)

    monkeypatch.setattr(ExpectedAttentionLayer, "token_scores", spy)
    g = torch.Generator().manual_seed(1)
    ids, mask = torch.randint(3, 97, (2, 50), generator=g), torch.ones(2, 50, dtype=torch.long)
    ids[0, :7], mask[0, :7] = 0, 0
    with attnsieve.patched(model, "dense", kv="expected-attention", kv_budget=0.3):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    h = hidden["h"]
    q_pre = module.q_proj(h).view(2, 50, -1, module.head_dim).transpose(1, 2)
    if hasattr(module, "q_norm"):
        q_pre = module.q_norm(q_pre)
    rot = seen["rotary"]
    assert rot is not None and rot.positions[0, 7:].tolist() == list(range(43))  # generate's real positions
    for b in range(2):
        real = seen["valid"][b].bool()
        back = unrotate(seen["q"][b][:, real], rot.inv_freq, rot.positions[b][real])
        assert_close(back, q_pre[b][:, real].detach(), atol=1e-5, rtol=1e-4, what=f"row {b}")
    layer = out.cache.layers[idx].kv
    kept = [math.ceil(0.3 * n) + 3 for n in (43, 50)]  # the prompt compressed once; 3 decoded tokens appended
    assert [r.numel() for r in layer.pos] == [kept[r // layer.Hkv] for r in range(len(layer.pos))]


def test_scores_equal_kvpress_formula_from_the_models_own_hidden_states():
    """On a Gemma-3 layout (global layers with their own RoPE frequencies beside sliding ones), the scores
    equal kvpress's `ExpectedAttentionPress.score` recomputed from the layer's hidden states: pre-RoPE
    queries from q_proj and q_norm, the rotary module's cos/sin for the layer type at the next 512
    positions averaged into one matrix, then softmax(s mu.k + s^2 k.Sigma.k / 2) x ||v|| (s: the layer's scale)."""
    model = tiny_gemma3(sliding_window=16)
    li = 1  # a full-attention layer
    attn = model.model.layers[li].self_attn
    ids = torch.randint(3, 97, (1, 70), generator=torch.Generator().manual_seed(4))
    got, scores = {}, {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: got.update(h=kw["hidden_states"]), with_kwargs=True)
    orig = ExpectedAttentionLayer.token_scores

    def spy(self, q, k_new, new_valid, scale):
        out = orig(self, q, k_new, new_valid, scale)
        scores[self.layer_idx] = (out[0], self.keys[0].clone(), self.values[0].clone())
        return out

    try:
        ExpectedAttentionLayer.token_scores = spy
        with attnsieve.patched(model, "dense", kv="expected-attention", kv_budget=0.5):
            model(ids, use_cache=True)
    finally:
        ExpectedAttentionLayer.token_scores = orig
        hook.remove()
    ours, keys, values = scores[li]
    T, D, n_sink = ids.shape[1], attn.head_dim, 4
    with torch.no_grad():
        h = got["h"][:, n_sink:]
        q = attn.q_norm(attn.q_proj(h).view(1, h.shape[1], -1, D)).transpose(1, 2).double()[0]  # [H, n, D]
        cos, sin = model.model.rotary_emb(h, torch.arange(T, T + 512)[None], layer_type="full_attention")
    mu = q.mean(1)
    c = q - mu[:, None]
    cov = c.transpose(1, 2) @ c / q.shape[1]
    P = torch.zeros(D, D, dtype=torch.double)
    P[D // 2 :, : D // 2], P[: D // 2, D // 2 :] = torch.eye(D // 2), -torch.eye(D // 2)
    R = (cos[0].double()[:, None] * torch.eye(D, dtype=torch.double) + sin[0].double()[:, None] * P).mean(0)
    mu, cov = mu @ R.T, R @ cov @ R.T
    k = keys[n_sink:].double()
    sc = attn.scaling  # the layer's own scale (documented: kvpress's 1/sqrt(d) equals it on the real Gemma-3)
    z = mu @ k.T * sc + torch.einsum("ld,hde,le->hl", k, cov, k) * sc**2 / 2
    want = torch.softmax(z, -1).mean(0) * values[n_sink:].double().norm(dim=-1)
    assert_close(ours[n_sink:].double(), want, atol=1e-7, rtol=1e-4)

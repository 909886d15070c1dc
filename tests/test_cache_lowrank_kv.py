"""lowrank-kv: PCA basis against a naive eigen-decomposition; attention exact on the projected keys."""

from __future__ import annotations

import pytest
import torch

import attnsieve
from attnsieve.cache import make_policy
from attnsieve.cache.lowrank_kv import LowRankKVParams, principal_basis
from attnsieve.kernels import dense_attention

from helpers import assert_close

SCALE = 0.25


def exact(qq, kk, vv):
    out, lse = dense_attention(qq, kk, vv, causal=True, scale=SCALE)
    return attnsieve.methods.AttnOutput(out, 0, lse=lse)


def low_rank_keys(B, Hkv, T, D, rank, seed):
    """Keys near a rank-`rank` subspace (plus noise and an offset), as real keys are."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(B, Hkv, rank, D, generator=g)
    return torch.randn(B, Hkv, T, rank, generator=g) @ basis + 0.05 * torch.randn(B, Hkv, T, D, generator=g) + 1.0


def test_basis_spans_the_top_right_singular_vectors_of_the_centred_keys():
    k = low_rank_keys(1, 1, 80, 12, 5, 0)[0, 0]
    mu, P = principal_basis(k, 4)
    assert_close(mu, k.mean(0))
    assert_close(P.T @ P, torch.eye(4), atol=1e-5, rtol=1e-5)
    _, _, vh = torch.linalg.svd((k - k.mean(0)).double(), full_matrices=False)  # rows by decreasing variance
    top = vh[:4].T.float()
    assert_close(P @ P.T, top @ top.T, atol=1e-4, rtol=1e-4)  # the same subspace (signs and order aside)
    _, few = principal_basis(k[:3], 8)  # fewer keys than the rank: still 8 orthonormal directions
    assert_close(few.T @ few, torch.eye(8), atol=1e-5, rtol=1e-5)


def test_attention_equals_dense_attention_over_the_keys_projection():
    B, H, Hkv, T, D, r = 2, 4, 2, 40, 16, 8
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, T + 2, D, generator=g)
    k = low_rank_keys(B, Hkv, T + 2, D, 6, 1)
    v = torch.randn(B, Hkv, T + 2, D, generator=g)
    layer = make_policy("lowrank-kv", r / D).layer(0)
    layer.attend(q[:, :, :T], k[:, :, :T], v[:, :, :T], None, SCALE, exact)
    layer.attend(q[:, :, T : T + 1], k[:, :, T : T + 1], v[:, :, T : T + 1], None, SCALE, exact)
    out, _ = layer.attend(q[:, :, T + 1 :], k[:, :, T + 1 :], v[:, :, T + 1 :], None, SCALE, exact)
    proj = k.clone()  # naive: every stored key replaced by mu + P P^T (k - mu), the prompt's PCA
    for r_ in range(B * Hkv):
        b, h = divmod(r_, Hkv)
        kk = k[b, h, :T]
        mu = kk.mean(0)
        _, _, vh = torch.linalg.svd((kk - mu).double(), full_matrices=False)
        P = vh[:r].T.float()
        proj[b, h, : T + 1] = mu + (k[b, h, : T + 1] - mu) @ P @ P.T
    ref, _ = dense_attention(q[:, :, T + 1 :], proj, v, causal=True, scale=SCALE)  # the new key itself is exact
    assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_stored_keys_have_r_channels_and_bytes_are_real():
    T, D = 100, 32
    g = torch.Generator().manual_seed(2)
    q, v = torch.randn(1, 2, T, D, generator=g), torch.randn(1, 1, T, D, generator=g)
    k = low_rank_keys(1, 1, T, D, 4, 2)
    layer = make_policy("lowrank-kv", 0.25).layer(0)
    layer.attend(q, k, v, None, SCALE, exact)
    seg = layer.segments[0][0]
    assert seg.keys.shape == (T, 8) and seg.basis.shape == (D, 8) and seg.offset.shape == (D,)
    assert layer.keys[0].shape == (0, D)  # nothing left unprojected
    assert layer.nbytes() == (T * 8 + T * D + D * 8 + D) * 4 + T * 4
    assert layer.stored_tokens().tolist() == [[T]]
    full = make_policy("lowrank-kv", 1.0).layer(0)  # rank D: the keys themselves, exactly dense
    full.attend(q, k, v, None, SCALE, exact)
    assert not full.segments[0] and full.nbytes() == T * (2 * D + 1) * 4


def test_rank_is_the_ceiling_of_the_budget_and_kv_rank_without_one():
    assert make_policy("lowrank-kv", 0.3).layer(0).rank(10) == 3
    assert make_policy("lowrank-kv", 0.31).layer(0).rank(10) == 4
    assert make_policy("lowrank-kv").layer(0).rank(256) == 128
    with pytest.raises(ValueError, match=r"kv_rank must be in \(0, 1\], got 0"):
        LowRankKVParams(kv_rank=0)


def test_generation_with_padding_and_gqa_keeps_positions_and_saves_memory():
    from tiny_models import tiny_llama

    model = tiny_llama()
    ids = torch.randint(3, 97, (2, 80), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with attnsieve.patched(model, "dense", kv="lowrank-kv", kv_budget=0.25):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
    cache = out.cache
    assert cache.get_seq_length() == 82
    assert [n.tolist() for n in cache.stored_tokens().values()] == [[[77, 77], [82, 82]]] * 2
    assert cache.nbytes() < 0.75 * cache.dense_nbytes()

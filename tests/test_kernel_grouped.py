"""grouped_attention against a masked dense reference, with hypothesis-generated groups and pairs."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnsieve.kernels import merge
from attnsieve.kernels.grouped import grouped_attention

from helpers import assert_close

SETTINGS = settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])


def reference(q, k, v, allowed, scale):
    """Masked softmax over [N, R, K] in float64; empty rows give 0 and -inf."""
    s = (q.double() @ k.double().transpose(1, 2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(allowed, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None]), 0)
    return (p @ v.double()).float(), lse.float()


@st.composite
def grouped_case(draw):
    N = draw(st.integers(1, 3))
    R = draw(st.sampled_from([1, 7, 40]))
    K = draw(st.sampled_from([1, 9, 50]))
    G = draw(st.integers(1, 6))
    row_tile = draw(st.sampled_from([1, 4, 32]))
    per_row = draw(st.integers(0, 3))  # groups per row
    causal = draw(st.booleans())
    window = draw(st.sampled_from([None, 5, 30]))
    tags = draw(st.integers(0, 2))
    fused = draw(st.booleans())
    seed = draw(st.integers(0, 10_000))
    return N, R, K, G, row_tile, per_row, causal, window, tags, fused, seed


@SETTINGS
@given(grouped_case())
def test_grouped_attention_equals_masked_dense(case):
    N, R, K, G, row_tile, per_row, causal, window, n_tags, fused, seed = case
    D = 8
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(N, n, D, generator=g) for n in (R, K, K))
    # Groups: a random partition of each item's keys (disjoint), padded with empty slots.
    S = K // G + 2
    group_keys = torch.full((N, G, S), -1, dtype=torch.long)
    for n in range(N):
        perm = torch.randperm(K, generator=g)
        for i, key in enumerate(perm.tolist()):
            gi = i % G
            slot = i // G
            if slot < S:
                group_keys[n, gi, slot] = key
    # Each row picks `per_row` distinct groups.
    rows, groups = [], []
    for n in range(N):
        for r in range(R):
            for gi in torch.randperm(G, generator=g)[: min(per_row, G)].tolist():
                rows.append(n * R + r)
                groups.append(n * G + gi)
    pair_row, pair_group = torch.tensor(rows, dtype=torch.long), torch.tensor(groups, dtype=torch.long)
    key_ok = torch.rand(N, K, generator=g) < 0.8
    q_pos = torch.randint(0, 60, (N, R), generator=g)
    k_pos = torch.randint(0, 60, (N, K), generator=g)
    q_tags = torch.randint(0, 3, (N, R, n_tags), generator=g) if n_tags else None
    k_tags = torch.randint(0, 3, (N, K, n_tags), generator=g) if n_tags else None

    res = grouped_attention(
        q, k, v, pair_row, pair_group, group_keys, scale=0.3, key_ok=key_ok, q_pos=q_pos, k_pos=k_pos,
        causal=causal, window=window, q_tags=q_tags, k_tags=k_tags, row_tile=row_tile, fused=fused,
        chunk_elems=2000,  # several batches
    )

    allowed = torch.zeros(N, R, K, dtype=torch.bool)
    for row, grp in zip(rows, groups, strict=True):
        n, r, gi = row // R, row % R, grp % G
        for key in group_keys[n, gi].tolist():
            if key >= 0:
                allowed[n, r, key] = True
    allowed &= key_ok[:, None, :]
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    if causal:
        allowed &= diff >= 0
    if window is not None:
        allowed &= diff < window
    if n_tags:
        allowed &= ~(q_tags[:, :, None, :] == k_tags[:, None, :, :]).any(-1)
    ref_out, ref_lse = reference(q, k, v, allowed, 0.3)
    assert_close(res.out, ref_out, atol=1e-5, rtol=1e-4)
    assert torch.equal(torch.isfinite(res.lse), torch.isfinite(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert_close(res.lse[fin], ref_lse[fin], atol=1e-5, rtol=1e-5)
    assert res.cells == int(allowed.sum())


def test_pairs_of_a_row_merge_like_separate_calls():
    """Two groups attended in one call equal two single-group calls merged by lse."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 5, 8, generator=g), torch.randn(1, 12, 8, generator=g), torch.randn(1, 12, 8, generator=g)
    group_keys = torch.arange(12).view(1, 2, 6)
    rows = torch.arange(5)
    both = grouped_attention(q, k, v, torch.cat([rows, rows]), torch.cat([rows * 0, rows * 0 + 1]), group_keys)
    a = grouped_attention(q, k, v, rows, rows * 0, group_keys)
    b = grouped_attention(q, k, v, rows, rows * 0 + 1, group_keys)
    out, lse = merge(a.out, a.lse, b.out, b.lse)
    assert_close(both.out, out)
    assert_close(both.lse, lse)
    assert both.cells == a.cells + b.cells == 5 * 12


def test_rows_without_pairs_are_empty():
    q, k, v = torch.randn(1, 3, 4), torch.randn(1, 4, 4), torch.randn(1, 4, 4)
    res = grouped_attention(q, k, v, torch.tensor([1]), torch.tensor([0]), torch.arange(4).view(1, 1, 4))
    assert torch.isinf(res.lse[0, 0]) and torch.isinf(res.lse[0, 2]) and torch.isfinite(res.lse[0, 1])
    assert float(res.out[0, 0].abs().sum()) == 0.0

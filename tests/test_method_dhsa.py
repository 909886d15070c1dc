"""DHSA: boundaries, chunk summaries and token upsampling against naive loops; execution; density."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_method_hip import implied_mask

from attnsieve.kernels import dense_attention, exact_cells
from attnsieve.methods import LayerContext, make
from attnsieve.methods.dhsa import chunk_boundaries, chunk_scores, select_tokens, split_budget

from helpers import assert_close, masked_dense_reference


def naive_boundaries(k, valid, bs, w):
    """One boundary per key block: its most dissimilar gap, scored with explicit window means."""
    B, Hkv, Tk, D = k.shape
    x = k.permute(0, 2, 1, 3).reshape(B, Tk, Hkv * D).double()
    out = torch.zeros(B, -(-Tk // bs), dtype=torch.long)
    for b in range(B):
        for m in range(out.shape[1]):
            best, arg = -math.inf, min((m + 1) * bs, Tk)
            for c in range(m * bs + 1, (m + 1) * bs - w + 1):
                if c < w or c + w > Tk:
                    continue
                left = [t for t in range(c - w, c) if valid[b, t]]
                right = [t for t in range(c, c + w) if valid[b, t]]
                if not left or not right:
                    continue
                s = 1 - float(F.cosine_similarity(x[b, left].mean(0), x[b, right].mean(0), dim=0, eps=1e-6))
                if s > best:
                    best, arg = s, c
            out[b, m] = arg
    return out


@pytest.mark.parametrize("Tk,bs,w", [(300, 16, 4), (257, 32, 3), (64, 16, 8)], ids=str)
def test_boundaries_equal_naive_loop(Tk, bs, w):
    g = torch.Generator().manual_seed(Tk)
    k = torch.randn(2, 2, Tk, 8, generator=g)
    valid = torch.ones(2, Tk, dtype=torch.bool)
    valid[1, : Tk // 3] = False
    got = chunk_boundaries(k, valid, bs, w)
    assert torch.equal(got, naive_boundaries(k, valid, bs, w))
    # each boundary lies inside its block and its right window ends there
    m = torch.arange(got.shape[1])
    inside = (got > m * bs) & (got <= torch.clamp((m + 1) * bs - w, max=Tk))
    assert (inside | (got == torch.clamp((m + 1) * bs, max=Tk))).all()


def test_boundaries_follow_a_change_in_the_keys():
    """A switch between two key regimes inside a block is where that block's chunk ends."""
    g = torch.Generator().manual_seed(0)
    k = 0.1 * torch.randn(1, 1, 128, 16, generator=g)
    k[..., :77, :] += torch.randn(16, generator=g)
    k[..., 77:, :] += torch.randn(16, generator=g)
    assert int(chunk_boundaries(k, None, 64, 4)[0, 1]) == 77


def naive_selection(q, k, key_valid, bs, bnd, lo, hi, n_sel, Tk):
    """Token lists from explicit chunk means, lagged pooled queries and a token-level score matrix."""
    B, H, Tq, D = q.shape
    first = (Tk - Tq) // bs
    n_q = -(-Tk // bs) - first
    valid = torch.ones(B, Tk, dtype=torch.bool) if key_valid is None else key_valid
    km = k.double().mean(1)  # [B, Tk, D]
    qm = q.double().mean(1)  # [B, Tq, D]
    out = []
    for b in range(B):
        rows_b = []
        for j in range(n_q):
            gidx = first + j
            # lagged query representative: real queries of the previous grid block, else own first one
            prev = [p for p in range((gidx - 1) * bs, gidx * bs) if p >= Tk - Tq and p >= 0 and valid[b, p]]
            own = [p for p in range(gidx * bs, min((gidx + 1) * bs, Tk)) if p >= Tk - Tq and valid[b, p]]
            rows = prev if prev else own[:1]
            qrep = qm[b, [p - (Tk - Tq) for p in rows]].sum(0) / math.sqrt(len(rows))
            scores = torch.full((Tk,), -math.inf, dtype=torch.float64)
            for t in range(int(lo[b, j]), int(hi[b, j])):
                m = int((bnd[b] <= t).sum())  # chunk of token t: [bnd[m - 1], bnd[m])
                s = int(bnd[b, m - 1]) if m > 0 else 0
                e = int(bnd[b, m]) if m < gidx else gidx * bs  # the chunk straddling g * bs is cut there
                members = [u for u in range(s, e) if valid[b, u]]
                rep = km[b, members].sum(0) / math.sqrt(len(members))
                scores[t] = qrep @ rep
            order = torch.sort(scores, descending=True, stable=True).indices
            keep = [int(t) for t in order[: int(n_sel[b, j])] if torch.isfinite(scores[t])]
            rows_b.append(keep)
        out.append(rows_b)
    return out


@pytest.mark.parametrize("Tq", [200, 90], ids=["prefill", "chunked"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_upsampled_selection_equals_naive_token_ranking(Tq, padded):
    Tk, bs = 200, 16
    g = torch.Generator().manual_seed(Tq + padded)
    q = torch.randn(2, 4, Tq, 8, generator=g)
    k = torch.randn(2, 2, Tk, 8, generator=g)
    valid = torch.ones(2, Tk, dtype=torch.bool)
    if padded:
        valid[0, :37] = False
    kv = valid if padded else None
    ctx = LayerContext(0, 0.3, None, kv)
    bnd = chunk_boundaries(k, kv, bs, 4)
    scores, span_s, span_e = chunk_scores(q, k, ctx, bs, bnd, True)
    first = (Tk - Tq) // bs
    n_q = scores.shape[1]
    gidx = torch.arange(first, first + n_q)
    lo = torch.tensor([[3 * bs if padded else 2 * bs], [2 * bs]]).expand(2, n_q)  # after the global blocks
    hi = torch.maximum(gidx * bs, lo)
    n_sel = torch.randint(0, 60, (2, n_q), generator=g)
    got = select_tokens(scores, span_s, span_e, lo, hi, n_sel)
    want = naive_selection(q, k, kv, bs, bnd, lo, hi, n_sel, Tk)
    for b in range(2):
        for j in range(n_q):
            assert [int(t) for t in got[b, j] if t >= 0] == want[b][j], (b, j)


def test_split_budget_keeps_own_block_then_globals():
    assert split_budget(1024, 64, 128) == (2, 1024 - 192)
    assert split_budget(100, 64, 128) == (1, 0)  # a small budget keeps the first (sink) block
    assert split_budget(300, 64, 0) == (0, 236)


@pytest.mark.parametrize("heads", [(4, 1), (4, 2)], ids=["GQA4", "GQA2"])
@pytest.mark.parametrize("window", [None, 70], ids=["global", "win70"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_executed_attention_equals_masked_dense(heads, window, padded):
    H, Hkv = heads
    T, bs = 230, 16
    g = torch.Generator().manual_seed(H + Hkv + (window or 0) + padded)
    q, k, v = (torch.randn(2, n, T, 16, generator=g) for n in (H, Hkv, Hkv))
    valid = torch.ones(2, T, dtype=torch.bool)
    if padded:
        valid[1, :41] = False
    kv = valid if padded else None
    method = make("dhsa", token_budget=80, block_size=bs, global_tokens=20, instruction_tokens=20)
    ctx = LayerContext(0, 0.25, window, kv)
    blocks, tokens = method.plan(q, k, ctx)
    assert tokens is not None
    res = method.prefill(q, k, v, ctx)
    mask = implied_mask(blocks, tokens[:, None], H, T, T, bs, window, kv)
    ref, _ = masked_dense_reference(q, k, v, mask, scale=0.25)
    real = valid[:, None, :, None]
    assert_close(torch.where(real, res.out, 0), torch.where(real, ref, 0), atol=1e-5, rtol=1e-4)
    assert res.cells == int(mask.sum())
    # the last instruction_tokens queries (whole blocks) attend every key they may see
    full = implied_mask(torch.ones_like(blocks), None, H, T, T, bs, window, kv)
    assert torch.equal(mask[:, :, -20:], full[:, :, -20:])


def test_selects_the_chunk_the_queries_point_at():
    """Keys of one span aligned with the late queries: the last query blocks attend the span."""
    g = torch.Generator().manual_seed(5)
    T, D = 2048, 64
    q = torch.randn(1, 4, T, D, generator=g)
    k, v = torch.randn(1, 1, T, D, generator=g), torch.randn(1, 1, T, D, generator=g)
    q = q[:, :, :1] + 0.3 * q  # neighbouring queries are correlated, as in real models
    k[:, :, 700:740] = k[:, :, 700:740] + 3 * q[:, :, -1:].mean(1, keepdim=True)
    method = make("dhsa", token_budget=256, block_size=32, instruction_tokens=0)  # 96 selected tokens
    _, tokens = method.plan(q, k, LayerContext(0, D**-0.5))
    for j in (-1, -5, -20):
        assert set(range(704, 737)) <= set(tokens[0, j].tolist()), j
    res = method.prefill(q, k, v, LayerContext(0, D**-0.5))
    ref, _ = dense_attention(q, k, v)
    err = (res.out[:, :, -1] - ref[:, :, -1]).norm() / ref[:, :, -1].norm()
    assert err < 0.05, float(err)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
@pytest.mark.parametrize("instruction_tokens", [0, 64])
@pytest.mark.parametrize("T", [2048, 4096])
def test_measured_density_lands_near_target(density, instruction_tokens, T):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, T, 16, generator=g) for n in (2, 1, 1))
    method = make("dhsa", density=density, instruction_tokens=instruction_tokens)
    res = method.prefill(q, k, v, LayerContext(0, 0.25))
    measured = res.cells / (2 * exact_cells(T, T))
    assert 0.9 * density <= measured <= 1.1 * density, measured


def test_density_keeps_the_dense_tail_only_when_it_fits():
    g = torch.Generator().manual_seed(4)
    for T, kept in [(4096, True), (2048, False)]:  # at 2k the tail, own and first blocks exceed 0.1
        q, k = (torch.randn(1, n, T, 16, generator=g) for n in (2, 1))
        blocks, _ = make("dhsa", density=0.1).plan(q, k, LayerContext(0, 0.25))
        assert bool(blocks[0, -1].all()) == kept, T


@pytest.mark.parametrize(
    "key,value",
    [("token_budget", 0), ("density", 0.0), ("block_size", 1024), ("boundary_window", 0),
     ("boundary_window", 40), ("global_tokens", -1), ("instruction_tokens", -1)],
)
def test_bad_parameters_raise_value_error_naming_the_value(key, value):
    with pytest.raises(ValueError, match=key):
        make("dhsa", **{key: value})

"""DHSA: boundaries, chunk summaries and token upsampling against naive loops, the paper's selection
against a loop re-implementation of the reference; execution; density."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_method_hip import implied_mask

from attnsieve.kernels import dense_attention, exact_cells
from attnsieve.methods import LayerContext, make
from attnsieve.methods.dhsa import chunk_boundaries, chunk_scores, ranked_boundaries, select_tokens, split_budget

from helpers import assert_close, masked_dense_reference


def naive_gap_score(x, valid_b, c, w):
    """1 - cos of the mean real keys left and right of gap c (x: [Tk, C] keys, heads concatenated)."""
    Tk = x.shape[0]
    if c < w or c + w > Tk:
        return None
    left = [t for t in range(c - w, c) if valid_b[t]]
    right = [t for t in range(c, c + w) if valid_b[t]]
    if not left or not right:
        return None
    return 1 - float(F.cosine_similarity(x[left].mean(0), x[right].mean(0), dim=0, eps=1e-6))


def naive_boundaries(k, valid, bs, w):
    """One boundary per key block (causal=True): its most dissimilar gap, scored with explicit window means."""
    B, Hkv, Tk, D = k.shape
    x = k.permute(0, 2, 1, 3).reshape(B, Tk, Hkv * D).double()
    out = torch.zeros(B, -(-Tk // bs), dtype=torch.long)
    for b in range(B):
        for m in range(out.shape[1]):
            best, arg = -math.inf, min((m + 1) * bs, Tk)
            for c in range(m * bs + 1, (m + 1) * bs - w + 1):
                s = naive_gap_score(x[b], valid[b], c, w)
                if s is not None and s > best:
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


def naive_ranked_boundaries(k, valid, w, max_boundaries, nms, instruction):
    """The reference's boundary choice, loop by loop: chunk ends per batch row, ascending, then Tk.

    Follows xiongsiheng/DHSA, legacy/utils/helper.py, `predict_boundaries` and
    `_select_boundary_candidates` (the predictor's score replaced by `naive_gap_score`):
    1. every gap c (position c - 1 ends a chunk) with w keys on both sides is a candidate;
    2. candidates in descending score order (the earlier gap first on ties);
    3. the instruction boundary (Tk - instruction + 1) is kept first when instruction > 0, and
       candidates after it are skipped;
    4. a candidate within `nms` of a kept boundary is suppressed, else kept; stop once
       `max_boundaries` are kept (checked after keeping one);
    5. the kept boundaries inside (0, Tk), sorted, then Tk.
    """
    B, Hkv, Tk, D = k.shape
    x = k.permute(0, 2, 1, 3).reshape(B, Tk, Hkv * D).double()
    out = []
    for b in range(B):
        scored = [(s, c) for c in range(Tk + 1) if (s := naive_gap_score(x[b], valid[b], c, w)) is not None]
        scored.sort(key=lambda sc: (-sc[0], sc[1]))
        ins = Tk - instruction + 1
        kept = [ins] if instruction > 0 else []
        for _, c in scored:
            if instruction > 0 and c > ins:
                continue
            if any(abs(c - e) <= nms for e in kept):
                continue
            kept.append(c)
            if len(kept) >= max_boundaries:
                break
        out.append(sorted({c for c in kept if 0 < c < Tk}) + [Tk])
    return out


@pytest.mark.parametrize("Tk,w,max_b,nms,instruction", [(300, 4, 400, 8, 64), (257, 3, 12, 5, 0), (120, 4, 30, 0, 10)],
                         ids=["tiling", "capped", "no-nms"])
def test_ranked_boundaries_equal_the_reference_nms(Tk, w, max_b, nms, instruction):
    g = torch.Generator().manual_seed(Tk + nms)
    k = torch.randn(2, 2, Tk, 8, generator=g)
    valid = torch.ones(2, Tk, dtype=torch.bool)
    valid[1, : Tk // 3] = False
    got = ranked_boundaries(k, valid, w, max_b, nms, instruction)
    for b, want in enumerate(naive_ranked_boundaries(k, valid, w, max_b, nms, instruction)):
        row = got[b].tolist()
        assert row[: len(want)] == want and set(row[len(want) :]) <= {Tk}, b


def test_ranked_boundaries_follow_the_strongest_changes_of_the_whole_sequence():
    """Three key regimes: the two switches (77 and 190) are the best gaps of the sequence, kept first."""
    g = torch.Generator().manual_seed(0)
    k = 0.1 * torch.randn(1, 1, 256, 16, generator=g)
    for s, e in ((0, 77), (77, 190), (190, 256)):
        k[..., s:e, :] += torch.randn(16, generator=g)
    assert ranked_boundaries(k, None, 4, 2, 8, 0)[0].tolist() == [77, 190, 256]
    # the instruction boundary (256 - 40 + 1) is kept first and counts against the cap
    assert ranked_boundaries(k, None, 4, 3, 8, 40)[0].tolist() == [77, 190, 217, 256]
    # ... and no gap after it is considered: with the instruction at 187 the switch at 190 is gone
    ends = ranked_boundaries(k, None, 4, 3, 8, 70)[0].tolist()
    assert 77 in ends and 187 in ends and 190 not in ends


def naive_selection(q, k, key_valid, bs, bnd, lo, hi, n_sel, Tk):
    """causal=True token lists from explicit chunk means, lagged pooled queries and a token-level score matrix."""
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


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
@pytest.mark.parametrize("heads", [(4, 1), (4, 2)], ids=["GQA4", "GQA2"])
@pytest.mark.parametrize("window", [None, 70], ids=["global", "win70"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_executed_attention_equals_masked_dense(heads, window, padded, causal):
    H, Hkv = heads
    T, bs = 230, 16
    g = torch.Generator().manual_seed(H + Hkv + (window or 0) + padded)
    q, k, v = (torch.randn(2, n, T, 16, generator=g) for n in (H, Hkv, Hkv))
    valid = torch.ones(2, T, dtype=torch.bool)
    if padded:
        valid[1, :41] = False
    kv = valid if padded else None
    method = make("dhsa", token_budget=80, block_size=bs, global_tokens=20, local_tokens=24, instruction_tokens=20,
                  causal=causal)
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


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
def test_selects_the_chunk_the_queries_point_at(causal):
    """Keys of one span aligned with the late queries: the last query blocks attend the span."""
    g = torch.Generator().manual_seed(5)
    T, D = 2048, 64
    q = torch.randn(1, 4, T, D, generator=g)
    k, v = torch.randn(1, 1, T, D, generator=g), torch.randn(1, 1, T, D, generator=g)
    q = q[:, :, :1] + 0.3 * q  # neighbouring queries are correlated, as in real models
    k[:, :, 700:740] = k[:, :, 700:740] + 3 * q[:, :, -1:].mean(1, keepdim=True)
    # 96 selected tokens: 256 - 32 (own block) - 128 (global); 352 - 128 (recent) - 128 (global)
    method = make("dhsa", token_budget=256 if causal else 352, block_size=32, instruction_tokens=0, causal=causal)
    _, tokens = method.plan(q, k, LayerContext(0, D**-0.5))
    for j in (-1, -5, -20):
        assert set(range(704, 737)) <= set(tokens[0, j].tolist()), j
    res = method.prefill(q, k, v, LayerContext(0, D**-0.5))
    ref, _ = dense_attention(q, k, v)
    err = (res.out[:, :, -1] - ref[:, :, -1]).norm() / ref[:, :, -1].norm()
    assert err < 0.05, float(err)


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
@pytest.mark.parametrize("instruction_tokens", [0, 64])
@pytest.mark.parametrize("T", [2048, 4096])
def test_measured_density_lands_near_target(density, instruction_tokens, T, causal):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, T, 16, generator=g) for n in (2, 1, 1))
    method = make("dhsa", density=density, instruction_tokens=instruction_tokens, causal=causal)
    res = method.prefill(q, k, v, LayerContext(0, 0.25))
    measured = res.cells / (2 * exact_cells(T, T))
    assert 0.9 * density <= measured <= 1.1 * density, measured


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
def test_density_keeps_the_dense_tail_only_when_it_fits(causal):
    g = torch.Generator().manual_seed(4)
    for T, kept in [(4096, True), (2048, False)]:  # at 2k the tail, own and first blocks exceed 0.1
        q, k = (torch.randn(1, n, T, 16, generator=g) for n in (2, 1))
        blocks, _ = make("dhsa", density=0.1, causal=causal).plan(q, k, LayerContext(0, 0.25))
        assert bool(blocks[0, -1].all()) == kept, T


@pytest.mark.parametrize(
    "key,value",
    [("token_budget", 0), ("density", 0.0), ("block_size", 1024), ("boundary_window", 0),
     ("boundary_window", 40), ("global_tokens", -1), ("instruction_tokens", -1), ("chunk_beta", 0),
     ("nms_window", -1), ("local_tokens", -1)],
)
def test_bad_parameters_raise_value_error_naming_the_value(key, value):
    with pytest.raises(ValueError, match=key):
        make("dhsa", **{key: value})


# --- The paper's (look-ahead) selection against a loop re-implementation of the reference ---


def naive_dhsa_reference(q, k, method):
    """DHSA's selection of the reference, one query block at a time: {j: key tokens up to the block's end}.

    Follows xiongsiheng/DHSA, legacy/utils/helper.py, `dhsa_sdpa` and `_obtain_dhsa_mask` (boundaries from
    `naive_ranked_boundaries`, as `predict_boundaries`), with "avgpool_norm" pooling:
    1. chunks: the ranked boundaries with at most (Tk // bs) * chunk_beta kept, the instruction start first;
    2. a query block with one of the last `instruction_tokens` queries attends every key (dense);
    3. otherwise its representative is its OWN queries averaged over heads, mean over rows times sqrt(rows);
       a chunk's is its keys averaged over heads, mean over the chunk times sqrt(its length) (the whole chunk);
    4. a key up to the block's end scores qrep . (its chunk's representative);
    5. the block keeps its `local_tokens` most recent keys (up to its end), the first `global_tokens` keys, and
       fills the rest of `token_budget` with the best-scoring keys between them (score, then position).
       The reference writes the global tokens over the earliest of its selected keys instead: attnsieve's
       documented deviation; the diagonal block is always attended;
    6. a block whose keys up to its end fit the budget keeps them all.
    """
    p = method.params
    _, H, T, D = q.shape
    bs = p.block_size
    valid = torch.ones(1, T, dtype=torch.bool)
    ends = naive_ranked_boundaries(k, valid, p.boundary_window, (T // bs) * p.chunk_beta, p.nms_window,
                                   p.instruction_tokens)[0]
    starts = [0] + ends[:-1]
    km, qm = k[0].double().mean(0), q[0].double().mean(0)  # [T, D] over heads
    rep = [km[s:e].mean(0) * math.sqrt(e - s) for s, e in zip(starts, ends, strict=True)]
    chunk_of = [next(i for i, e in enumerate(ends) if t < e) for t in range(T)]
    out = {}
    for j in range(-(-T // bs)):
        end = min((j + 1) * bs, T)
        if end > T - p.instruction_tokens or end <= p.token_budget:
            out[j] = set(range(end))
            continue
        rows = range(j * bs, end)
        qrep = qm[list(rows)].mean(0) * math.sqrt(len(rows))
        G = min(p.global_tokens, p.token_budget)
        r = min(p.local_tokens, p.token_budget - G)
        recent = set(range(end - r, end))
        cand = sorted(range(G, end - r), key=lambda t: (-float(qrep @ rep[chunk_of[t]]), t))
        out[j] = set(range(G)) | recent | set(cand[: p.token_budget - G - r]) | set(rows)
    return out


def support_key_sets(method, q, k):
    """{j: key tokens up to block j's end} that the method's plan puts in scope (blocks and tokens)."""
    blocks, tokens = method.plan(q, k, LayerContext(0, q.shape[-1] ** -0.5))
    T, bs = k.shape[2], method.params.block_size
    out = {}
    for j in range(blocks.shape[1]):
        end = min((j + 1) * bs, T)
        keys = {t for kb in torch.nonzero(blocks[0, j]).flatten().tolist() for t in range(kb * bs, (kb + 1) * bs)}
        if tokens is not None:
            keys |= {int(t) for t in tokens[0, j] if t >= 0}
        out[j] = {t for t in keys if t < end}
    return out


@pytest.mark.parametrize("T,chunk_beta,heads", [(400, 8, (4, 2)), (333, 1, (2, 1))], ids=["T400-beta8", "T333-beta1"])
def test_paper_selection_equals_reference_loop(T, chunk_beta, heads):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(1, heads[0], T, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, heads[1], T, 16, generator=g, dtype=torch.float64)
    k = k + 0.5 * torch.randn(1, heads[1], 1, 16, generator=g, dtype=torch.float64)  # a shared key direction
    method = make("dhsa", token_budget=100, block_size=16, boundary_window=3, chunk_beta=chunk_beta, nms_window=4,
                  global_tokens=32, local_tokens=24, instruction_tokens=20)
    assert method.params.causal is False  # the paper's selection is the default
    got = support_key_sets(method, q, k)
    for j, keys in naive_dhsa_reference(q, k, method).items():
        assert got[j] == keys, (j, sorted(got[j] ^ keys))


def test_paper_selection_of_a_planted_pattern():
    """Written out by hand: keys 200..215 stand out from a shared key direction (so the gaps 200 and 216
    are the sequence's strongest boundaries), and only the question (queries 480..511) points at them.
    With 32 global, 32 recent and 16 scored tokens, the question's block keeps exactly
    [0, 32) + [200, 216) + [480, 512); the leak-free form, ranking with block 14's queries, misses 200..215."""
    T, D = 512, 32
    g = torch.Generator().manual_seed(12)
    u = F.normalize(torch.ones(D), dim=0)
    m = torch.randn(D, generator=g)
    m = F.normalize(m - (m @ u) * u, dim=0)  # the shared key direction, orthogonal to u
    q, k = 0.3 * torch.randn(1, 1, T, D, generator=g), 0.3 * torch.randn(1, 1, T, D, generator=g)
    q = q - (q @ u)[..., None] * u - (q @ m)[..., None] * m  # queries see neither direction ...
    q[:, :, -32:] += 3 * u  # ... except the question's, along u
    k = k + 2 * m
    k[:, :, 200:216] = k[:, :, 200:216] - 2 * m + 2 * u
    kw = dict(token_budget=80, block_size=32, global_tokens=32, local_tokens=32, instruction_tokens=0)
    got = support_key_sets(make("dhsa", **kw), q, k)
    assert got[15] == set(range(32)) | set(range(200, 216)) | set(range(480, 512))
    lagged = support_key_sets(make("dhsa", causal=True, **kw), q, k)
    assert not set(range(200, 216)) <= lagged[15]


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
def test_chunked_prefill_equals_masked_dense(causal):
    """Tq < Tk: the chunk's own queries (or, causal, the previous block's) estimate; outputs stay exact."""
    Tq, Tk, bs = 90, 230, 16
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, Tq, 16, generator=g)
    k, v = torch.randn(1, 2, Tk, 16, generator=g), torch.randn(1, 2, Tk, 16, generator=g)
    method = make("dhsa", token_budget=80, block_size=bs, global_tokens=20, local_tokens=24, instruction_tokens=20,
                  causal=causal)
    ctx = LayerContext(0, 0.25)
    blocks, tokens = method.plan(q, k, ctx)
    assert tokens is not None
    mask = implied_mask(blocks, tokens[:, None], 4, Tq, Tk, bs)
    ref, _ = masked_dense_reference(q, k, v, mask, scale=0.25)
    res = method.prefill(q, k, v, ctx)
    assert_close(res.out, ref, atol=1e-5, rtol=1e-4)
    assert res.cells == int(mask.sum())

"""HiP: the vectorised tree search against a naive recursion, its cost, its selection and execution."""

from __future__ import annotations

import math

import pytest
import torch

from attnsieve.kernels import block_grid, dense_attention, exact_cells
from attnsieve.methods import LayerContext, make
from attnsieve.methods._lagged import lagged_queries, own_queries
from attnsieve.methods.hip import hierarchical_topk

from helpers import assert_close, masked_dense_reference


def naive_tree_search(qr, keys, lo, hi, K, b_k, representative):
    """HiP's pruning for one item, written as a plain recursion over lists of (start, size) chunks.

    Units are the b_k-token blocks [u * b_k, (u + 1) * b_k) meeting [lo, hi), counted from u0 = lo // b_k.
    Returns (sorted absolute unit indices, representatives scored).
    """
    u0 = lo // b_k
    n = -(-hi // b_k) - u0 if hi > lo else 0
    if n <= K:
        return [u0 + u for u in range(n)], 0

    def score(start, size):
        u = u0 + start + (size // 2 if representative == "center" else 0)
        toks = [t for t in range(u * b_k, (u + 1) * b_k) if lo <= t < hi]
        return float((qr @ keys[toks].T).max())

    def refine(chunks, scored):
        if all(size == 1 for _, size in chunks):
            return chunks, scored
        halves = []
        for start, size in chunks:
            left = (size + 1) // 2
            for s, z in ((start, left), (start + left, size - left)):
                if z > 0:
                    halves.append((score(s, z), s, z))
        halves.sort(key=lambda h: -h[0])
        return refine([(s, z) for _, s, z in halves[:K]], scored + len(halves))

    chunks = [(n * i // K, n * (i + 1) // K - n * i // K) for i in range(K)]
    chunks, scored = refine(chunks, 0)
    return sorted(u0 + s for s, _ in chunks), scored


@pytest.mark.parametrize("K,b_k", [(4, 1), (7, 2), (5, 3)], ids=lambda x: str(x))
@pytest.mark.parametrize("representative", ["center", "first"])
def test_vectorised_tree_search_equals_naive_recursion(K, b_k, representative):
    g = torch.Generator().manual_seed(K * 10 + b_k)
    N, R, D, Tk = 7, 5, 8, 300
    q = torch.randn(N, R, D, generator=g, dtype=torch.float64)
    q_ok = torch.rand(N, R, generator=g) < 0.7
    q_ok[:, 2] = True
    keys = torch.randn(2, Tk, D, generator=g, dtype=torch.float64)
    seq = torch.tensor([0, 1, 0, 1, 0, 1, 0])
    lo = torch.tensor([0, 5, 17, 0, 100, 3, 50])
    hi = torch.tensor([300, 299, 20, 1, 287, 3 + K * b_k, 251])  # long, tiny, empty-ish, exactly K units
    units, scored = hierarchical_topk(q, q_ok, keys, seq, lo, hi, K, b_k, representative)
    total = 0
    for i in range(N):
        want, n_scored = naive_tree_search(q[i][q_ok[i]], keys[seq[i]], int(lo[i]), int(hi[i]), K, b_k, representative)
        got = [int(u) for u in units[i] if u >= 0]
        assert got == want, f"item {i}"
        total += n_scored
    assert scored == total


def test_an_empty_half_past_the_last_key_is_never_gathered():
    """A one-unit chunk at the end of the keys halves into itself and an empty half one unit past them;
    that half is masked, and its representative must not be gathered (it raised an IndexError)."""
    keys = torch.tensor([-1.0, -1, 1, 2, 3])[None, :, None]  # [S=1, Tk=5, D=1]: units 4, then 3, score best
    q, ok = torch.ones(1, 1, 1), torch.ones(1, 1, dtype=torch.bool)
    units, scored = hierarchical_topk(q, ok, keys, torch.tensor([0]), torch.tensor([0]), torch.tensor([5]), 2, 1)
    assert units.tolist() == [[3, 4]]  # chunks [0, 2) [2, 5) -> keep [2, 4) [4, 5) -> keep 3, 4
    assert scored == 4 + 3


def test_scored_representatives_grow_as_t_log_t():
    """Each query block scores at most 2k representatives per halving, and halvings grow as log T."""
    bs, K, b_k, D, R = 64, 16, 2, 16, 4
    counts = {}
    for T in (1024, 2048, 4096, 8192):
        g = torch.Generator().manual_seed(T)
        n_q = T // bs
        q = torch.randn(n_q, R, D, generator=g)
        keys = torch.randn(1, T, D, generator=g)
        lo = torch.zeros(n_q, dtype=torch.long)
        hi = torch.arange(n_q) * bs  # the causal range before each query block
        ok, seq = torch.ones(n_q, R, dtype=torch.bool), torch.zeros(n_q, dtype=torch.long)
        _, counts[T] = hierarchical_topk(q, ok, keys, seq, lo, hi, K, b_k)
        bound = n_q * 2 * K * math.ceil(math.log2(T / (K * b_k)))
        assert counts[T] <= bound, (T, counts[T], bound)
    # T log T: more than linear (the log factor), far below the quadratic growth of scoring every key.
    for T in (1024, 2048, 4096):
        assert 2.0 < counts[2 * T] / counts[T] < 2.0 * (1 + 1.5 / math.log2(T / (K * b_k))), counts
    n_keys = {T: sum(j * bs // b_k for j in range(T // bs)) for T in counts}
    assert counts[8192] / counts[1024] < 0.25 * n_keys[8192] / n_keys[1024]


def test_lagged_representatives_precede_their_block():
    q = torch.randn(1, 2, 70, 4)
    reps, ok = lagged_queries(q, 70, 16, None, stride=2)  # grid blocks of 16, queries 0..69
    assert reps.shape == (1, 2, 5, 8, 4)
    assert not ok[0, 0, 1:].any() and ok[0, 0, 0]  # first block: its own first query only
    assert_close(reps[0, :, 0, 0], q[0, :, 0])
    assert_close(reps[0, :, 3], q[0, :, 33:48:2])  # block 3 uses block 2's odd rows
    assert ok[0, 4].tolist() == [True] * 8  # block 4 (queries 64..69) uses block 3 (48..63)
    valid = torch.ones(1, 70, dtype=torch.bool)
    valid[0, :20] = False  # left padding: block 1 has its previous block all padding
    reps, ok = lagged_queries(q, 70, 16, valid, stride=1)
    assert ok[0, 1].tolist() == [True] + [False] * 15
    assert_close(reps[0, :, 1, 0], q[0, :, 20])  # falls back to its own first real query


def test_own_representatives_are_the_block_s_sampled_rows():
    q = torch.randn(1, 2, 70, 4)
    reps, ok = own_queries(q, 70, 16, None, stride=2)  # grid blocks of 16, queries 0..69
    assert reps.shape == (1, 2, 5, 8, 4)
    assert_close(reps[0, :, 0], q[0, :, 1:16:2])  # rows 1, 3, ..., 15 of the block itself
    assert_close(reps[0, :, 3], q[0, :, 49:64:2])
    assert ok[0, 4].tolist() == [True] * 3 + [False] * 5  # block 4 holds queries 64..69: rows 1, 3, 5
    valid = torch.ones(1, 70, dtype=torch.bool)
    valid[0, :31] = False  # left padding: block 1 has one real query, row 15 (position 31)
    reps, ok = own_queries(q, 70, 16, valid, stride=2)
    assert ok[0, 1].tolist() == [False] * 7 + [True]
    assert not ok[0, 0].any()
    # a chunk (Tq < Tk) samples only its own queries: block 2 of 70 keys holds chunk rows 2..15
    reps, ok = own_queries(q[:, :, 34:], 70, 16, None, stride=2)
    assert ok[0, 0].tolist() == [False] + [True] * 7
    assert_close(reps[0, :, 0, 1:], q[0, :, 35:48:2])
    # a chunk starting at 47 holds only row 15 of block 2, not a sampled row of stride 3 (2, 5, .., 14)
    reps, ok = own_queries(q[:, :, 47:], 70, 16, None, stride=3)
    assert ok[0, 0].tolist() == [True] + [False] * 4
    assert_close(reps[0, :, 0, 0], q[0, :, 47])  # its last (only) real query stands in


def implied_mask(band, tokens, H, Tq, Tk, bs, window=None, key_valid=None):
    """[B, H, Tq, Tk] bool mask of the band blocks plus the listed tokens (slow and obvious)."""
    B = band.shape[0]
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    mask = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    Hs = tokens.shape[1] if tokens is not None else H
    for b in range(B):
        for i in range(Tq):
            p = Tk - Tq + i
            j = p // bs - first
            for t in range(p + 1):
                if window is not None and p - t >= window:
                    continue
                if key_valid is not None and not (key_valid[b, t] and key_valid[b, p]):
                    continue
                if band[b, j, t // bs]:
                    mask[b, :, i, t] = True
            if tokens is None:
                continue
            for h in range(H):
                for t in tokens[b, h * Hs // H, j].tolist():
                    if t < 0 or t > p or (window is not None and p - t >= window):
                        continue
                    if key_valid is not None and not (key_valid[b, t] and key_valid[b, p]):
                        continue
                    mask[b, h, i, t] = True
    return mask


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
@pytest.mark.parametrize("heads,per_head", [((4, 1), True), ((4, 2), False), ((2, 2), True)], ids=str)
@pytest.mark.parametrize("window", [None, 70], ids=["global", "win70"])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_executed_attention_equals_masked_dense(heads, per_head, window, padded, causal):
    H, Hkv = heads
    T, bs = 230, 16
    g = torch.Generator().manual_seed(H + Hkv + (window or 0))
    q, k, v = (torch.randn(2, n, T, 16, generator=g) for n in (H, Hkv, Hkv))
    valid = torch.ones(2, T, dtype=torch.bool)
    if padded:
        valid[1, :41] = False
    kv = valid if padded else None
    method = make("hip", mask_k=24, block_size=bs, block_size_k=3, window=20, sink=5, per_head=per_head,
                  causal=causal)
    ctx = LayerContext(0, 0.25, window, kv)
    band, tokens = method.plan(q, k, ctx)
    assert tokens is not None and tokens.shape[1] == (H if per_head else Hkv)
    res = method.prefill(q, k, v, ctx)
    mask = implied_mask(band, tokens, H, T, T, bs, window, kv)
    ref, _ = masked_dense_reference(q, k, v, mask, scale=0.25)
    real = valid[:, None, :, None]
    assert_close(torch.where(real, res.out, 0), torch.where(real, ref, 0), atol=1e-5, rtol=1e-4)
    assert res.cells == int(mask.sum())
    # every query keeps its own block; every scored key precedes the query block
    T_idx = torch.arange(T)
    assert mask[:, :, T_idx, T_idx][valid[:, None].expand(-1, H, -1)].all()


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
def test_finds_a_planted_key_block(causal):
    """Keys aligned with the late queries far back in the context are found and attended.

    HiP rests on attention locality (a chunk's representative stands for its neighbours), so the
    planted keys rise smoothly over ~40 tokens, as real attention peaks do, instead of one
    hard-edged token that no representative would sample.
    """
    g = torch.Generator().manual_seed(6)
    T, D = 2048, 64
    q = torch.randn(1, 4, T, D, generator=g)
    k, v = torch.randn(1, 1, T, D, generator=g), torch.randn(1, 1, T, D, generator=g)
    q = q[:, :, :1] + 0.3 * q  # neighbouring queries are correlated, as in real models
    bump = torch.exp(-((torch.arange(T) - 600.0) / 8) ** 2)
    k = k + 10 * bump[:, None] * q[:, :, -1:].mean(1, keepdim=True)
    method = make("hip", density=0.2, block_size=32, causal=causal)
    ctx = LayerContext(0, D**-0.5)
    _, tokens = method.plan(q, k, ctx)
    for h in range(4):  # the last query block of every head holds the peak
        assert set(range(592, 609)) <= set(tokens[0, h, -1].tolist()), h
    res = method.prefill(q, k, v, ctx)
    ref, _ = dense_attention(q, k, v)
    err = (res.out[:, :, -1] - ref[:, :, -1]).norm() / ref[:, :, -1].norm()
    assert err < 0.05, float(err)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_measured_density_lands_near_target(density):
    g = torch.Generator().manual_seed(3)
    T = 2048
    q, k, v = (torch.randn(1, n, T, 16, generator=g) for n in (2, 1, 1))
    res = make("hip", density=density, block_size=32).prefill(q, k, v, LayerContext(0, 0.25))
    measured = res.cells / (2 * exact_cells(T, T))
    assert 0.85 * density <= measured <= 1.15 * density + 0.01, measured


def test_default_budget_scales_nothing_and_covers_short_inputs():
    """Without `density` the paper's k = 512 applies; an input shorter than it is attended exactly."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, n, 500, 16, generator=g) for n in (2, 1, 1))
    method = make("hip")
    assert method.budget(q, 500, None) == (1 + 256 // 64, 512)
    res = method.prefill(q, k, v, LayerContext(0, 0.25))
    ref, _ = dense_attention(q, k, v, scale=0.25)
    assert_close(res.out, ref)


@pytest.mark.parametrize(
    "key,value",
    [("mask_k", 0), ("density", 1.5), ("block_size", 8), ("block_size_k", 0), ("block_stride_q", 0),
     ("window", -1), ("sink", -1), ("representative", "last")],
)
def test_bad_parameters_raise_value_error_naming_the_value(key, value):
    with pytest.raises(ValueError, match=key):
        make("hip", **{key: value})


# --- The paper's (look-ahead) estimate against a loop re-implementation of the reference ---


def naive_hip_reference(q, k, method):
    """HiP's mask estimation, one (query head, query block) at a time: {(h, j): selected key tokens}.

    Follows DeepAuto-AI/hip-attention v1.1, src/hip_attn/v1_1/attention2_draft_prefetch.py,
    `masking_iteration_draft_cuda_initialize` and `masking_iteration_draft_cuda_dup_and_score`
    (parameters of `HiPAttentionArgs`), one search per query head:
    1. the scoring queries of block j are its OWN rows block_stride_q - 1, 2 * block_stride_q - 1, ...
       (the reference's `idx_tdst`), never rows of another block (a last block too short to hold one uses
       its last query, where the reference's rows would be masked out);
    2. candidates are the b_k-token key units of [sink, start of the block's local window) (attnsieve's
       window is block aligned: its start is (j - ceil(window / bs)) * bs);
    3. k = mask_k / b_k chunks split the candidates (evenly: attnsieve's documented deviation from the
       power-of-two alignment); while a chunk spans more than one unit each is halved (ceil/floor) and
       each half is scored by its centre unit: the max over the sampled queries and the unit's keys of
       q . k; the k best halves stay (`naive_tree_search`);
    4. the block attends the k units' tokens and the `sink` first tokens (besides its band).
    Causal masking of the listed tokens is left to the kernel.
    """
    p = method.params
    _, H, T, _ = q.shape
    G = H // k.shape[1]
    bs, b_k, s = p.block_size, p.block_size_k, p.block_stride_q
    band = 1 + -(-p.window // bs)
    out = {}
    for h in range(H):
        for j in range(-(-T // bs)):
            rows = [r for r in range(j * bs + s - 1, (j + 1) * bs, s) if r < T] or [T - 1]
            band_start = (j - band + 1) * bs
            lo, hi = p.sink, max(band_start, p.sink)
            units, _ = naive_tree_search(q[0, h, rows], k[0, h // G], lo, hi, p.mask_k // b_k, b_k, "center")
            chosen = {t for u in units for t in range(u * b_k, (u + 1) * b_k) if lo <= t < hi}
            out[h, j] = chosen | {t for t in range(min(p.sink, T)) if t < band_start}
    return out


@pytest.mark.parametrize("T,stride,heads", [(300, 2, (4, 2)), (257, 3, (2, 1))], ids=["T300-s2-GQA2", "T257-s3-GQA"])
def test_paper_selection_equals_reference_loop(T, stride, heads):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(1, heads[0], T, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, heads[1], T, 16, generator=g, dtype=torch.float64)
    method = make("hip", mask_k=12, block_size=16, block_size_k=2, block_stride_q=stride, window=32, sink=4)
    assert method.params.causal is False  # the paper's estimate is the default
    _, tokens = method.plan(q, k, LayerContext(0, 0.25))
    want = naive_hip_reference(q, k, method)
    for (h, j), chosen in want.items():
        assert {int(t) for t in tokens[0, h, j] if t >= 0} == chosen, (h, j)


def test_paper_selection_of_a_planted_pattern():
    """Written out by hand: only the question (queries 480..511) points at a smooth bump of keys peaking
    at 201; with 4 units of 2 the question's own block keeps exactly the 8 tokens 198..205 around it."""
    T, D = 512, 32
    g = torch.Generator().manual_seed(12)
    q, k = 0.3 * torch.randn(1, 1, T, D, generator=g), 0.3 * torch.randn(1, 1, T, D, generator=g)
    u = torch.nn.functional.normalize(torch.ones(D), dim=0)
    q = q - (q @ u)[..., None] * u  # no query but the question's has a component along u
    q[:, :, -32:] += 3 * u
    k = k + 4 * D**0.5 * torch.exp(-((torch.arange(T) - 201.0) / 12) ** 2)[:, None] * u
    kw = dict(mask_k=8, block_size=32, block_size_k=2, window=32, sink=0)
    _, tokens = make("hip", **kw).plan(q, k, LayerContext(0, D**-0.5))
    assert sorted(t for t in tokens[0, 0, 15].tolist() if t >= 0) == list(range(198, 206))
    # the leak-free form scores block 15's candidates with block 14's queries, blind to the bump
    _, lagged = make("hip", causal=True, **kw).plan(q, k, LayerContext(0, D**-0.5))
    assert not set(range(198, 206)) & set(lagged[0, 0, 15].tolist())


@pytest.mark.parametrize("causal", [False, True], ids=["lookahead", "causal"])
def test_chunked_prefill_equals_masked_dense(causal):
    """Tq < Tk: the chunk's own queries (or, causal, the previous block's) score; outputs stay exact."""
    Tq, Tk, bs = 90, 230, 16
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, Tq, 16, generator=g)
    k, v = torch.randn(1, 2, Tk, 16, generator=g), torch.randn(1, 2, Tk, 16, generator=g)
    method = make("hip", mask_k=24, block_size=bs, block_size_k=3, window=20, sink=5, causal=causal)
    ctx = LayerContext(0, 0.25)
    band, tokens = method.plan(q, k, ctx)
    mask = implied_mask(band, tokens, 4, Tq, Tk, bs)
    ref, _ = masked_dense_reference(q, k, v, mask, scale=0.25)
    res = method.prefill(q, k, v, ctx)
    assert_close(res.out, ref, atol=1e-5, rtol=1e-4)
    assert res.cells == int(mask.sum())

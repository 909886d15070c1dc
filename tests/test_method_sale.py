"""SALE: low-bit estimates, the paper's and the causal selection against naive loops, planted keys, execution."""

from __future__ import annotations

import math

import pytest
import torch

import attnsieve.methods.sale as sale_mod
from attnsieve.kernels import block_grid, dense_attention, exact_cells
from attnsieve.methods import LayerContext, make
from attnsieve.methods.sale import quantize

from helpers import assert_close, masked_dense_reference


def qkv(B=1, H=4, Hkv=2, T=200, D=16, seed=0):
    """Correlated queries and keys with a shared offset (the bias smoothing removes)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 1, 1, D, generator=g)
    q = (base + 0.7 * torch.randn(B, H, T, D, generator=g)) * 1.5
    k = torch.randn(B, Hkv, T, D, generator=g) + 2 * torch.randn(1, 1, 1, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    return q, k, v


def naive_selection(q, k, p, key_valid=None, window=None, chunk_blocks=None, exact=False):
    """Per row and key block, in plain loops: SALE's rule with our chunked smoothing means.

    Returns (union [B, H, NQ, NK], own [B, H, NQ, bs, NK]) where own is the blocks each row
    attends: the forced ones plus those selected by itself or an earlier row of its block.
    """
    B, H, T, D = q.shape
    G = H // k.shape[1]
    bs, scale = p.block_size, D**-0.5
    first, n_q, n_k = block_grid(T, T, bs)
    local = -(-p.local_window // bs)
    valid = torch.ones(B, T, dtype=torch.bool) if key_valid is None else key_valid
    union = torch.zeros(B, H, n_q, n_k, dtype=torch.bool)
    own = torch.zeros(B, H, n_q, bs, n_k, dtype=torch.bool)
    for b in range(B):
        real_pos = [t for t in range(T) if valid[b, t]]
        sink0 = real_pos[0] // bs if real_pos else 0

        def allowed(j, kb, b=b):  # causal, holds a real key, its last key inside the first row's window
            return kb <= j and bool(valid[b, kb * bs : (kb + 1) * bs].any()) and (
                window is None or j * bs - ((kb + 1) * bs - 1) < window)

        for h in range(H):
            for j in range(n_q):
                forced = [kb for kb in range(n_k) if allowed(j, kb)
                          and (sink0 <= kb < sink0 + p.sink_blocks or j - local < kb <= j)]
                cand = [kb for kb in range(n_k) if allowed(j, kb) and kb not in forced]
                start = (j // chunk_blocks) * chunk_blocks * bs  # the row chunk's first position
                before = [t for t in range(start) if valid[b, t]]
                qm = q[b, h, before].double().mean(0) if before else torch.zeros(D, dtype=torch.float64)
                km = k[b, h // G, before].double().mean(0) if before else torch.zeros(D, dtype=torch.float64)
                ki, sk = quantize((k[b, h // G].double() - km).float(), p.bits)
                sel_rows = []
                for r in range(bs):
                    pos = j * bs + r
                    picked = set()
                    if pos < T and valid[b, pos]:
                        keys = [t for kb in forced for t in range(kb * bs, min((kb + 1) * bs, T))
                                if t <= pos and valid[b, t] and (window is None or pos - t < window)]
                        lse = torch.logsumexp((k[b, h // G, keys].double() @ q[b, h, pos].double()) * scale, 0)
                        qi, sq = quantize((q[b, h, pos].double() - qm).float(), p.bits)
                        for kb in cand:
                            best = -math.inf
                            for t in range(kb * bs, min((kb + 1) * bs, T)):
                                if not valid[b, t] or (window is not None and pos - t >= window):
                                    continue
                                ks = k[b, h // G, t].double() - km
                                est = (float(qi.double() @ ki[t].double()) * float(sq) * float(sk[t])
                                       + float(qm @ ks) + float(q[b, h, pos].double() @ km))
                                if exact:  # the rule on exact scores
                                    est = float(q[b, h, pos].double() @ k[b, h // G, t].double())
                                best = max(best, est * scale)
                            if best - float(lse) > math.log(p.threshold):
                                picked.add(kb)
                    sel_rows.append(picked)
                seen = set()
                for r in range(bs):
                    seen |= sel_rows[r]
                    for kb in seen | set(forced):
                        own[b, h, j, r, kb] = True
                for kb in seen | set(forced):
                    union[b, h, j, kb] = True
    return union, own


def support_masks(sup, n_k):
    """(union [B, H, NQ, NK], per-row blocks [B, H, NQ, bs, NK]) from a BlockSupport (row_mask or not)."""
    union = sup.to_mask(n_k)
    if sup.row_mask is None:
        return union, union[:, :, :, None].expand(-1, -1, -1, sup.block_size, -1)
    blocks = sup.blocks
    own = torch.zeros(*blocks.shape[:3], sup.row_mask.shape[3], n_k + 1, dtype=torch.bool)
    idx = torch.where(blocks >= 0, blocks, n_k)[:, :, :, None, :].expand_as(sup.row_mask)
    own.scatter_(4, idx, sup.row_mask)
    return union, own[..., :n_k]


def naive_sale(q, k, bs, query_block, segment, local_window, tau, bits, key_valid=None):
    """The key blocks each query block of `query_block` rows attends in SALE, loop by loop: {(b, h, m): blocks}.

    Follows BirdChristopher/SALE (`flash_attn_func_int4_skip`, impl_version 2 = two passes):
    1. int4_flash_attn/quant_triton.py: smooth with the means of all queries and all keys (q - mean q,
       k - mean k), quantise each token symmetrically to [-7, 7] (bits 4), qmk = mean q . (k - mean k);
    2. csrc/flash_attn/src/flash_fwd_int4_sparse_kernel_v2.h, `compute_attn_1rowblock_skipping_v2`: query block
       m's keys end in key block NB - 1; after the sink block 0 the N = NB - 1 blocks are cut into segments of
       S = segment / bs blocks; with remain = N - S * ceil(N / S), the local window is the last
       S * ceil((L - remain) / S) + remain blocks (L = local_window / bs), the whole segments before it are
       the candidates;
    3. each row's exact log-sum-exp over the sink and local keys (causal, smoothed keys) gives its threshold
       lse + log(tau); a candidate block is kept for the whole query block when some row's largest estimate
       sq * sk * (q_int . k_int) + qmk (times the softmax scale) in it is above the threshold (the rows' OR).
    Head h reads KV head h // (H / Hkv) (the reference repeats KV). Padding (which the reference never has)
    is left out of the means, rows and keys, and the sink is the first block holding a real key.
    """
    B, H, T, D = q.shape
    G = H // k.shape[1]
    scale = D**-0.5
    S, L = segment // bs, -(-local_window // bs)
    top = 2 ** (bits - 1) - 1
    valid = torch.ones(B, T, dtype=torch.bool) if key_valid is None else key_valid

    def quant(x):  # symmetric per token, float32 like the method's inputs
        step = x.abs().max() / top
        step = step if step > 0 else torch.tensor(1.0)
        return torch.round(x / step).clamp(-top, top), float(step)

    out, picked = {}, {}
    for b in range(B):
        real = [t for t in range(T) if valid[b, t]]
        sink = real[0] // bs
        for h in range(H):
            kh = k[b, h // G].double()
            q_mean, k_mean = q[b, h, real].double().mean(0), kh[real].mean(0)
            ks = kh - k_mean
            kq = [quant(ks[t].float()) for t in range(T)]
            k_int = torch.stack([x for x, _ in kq]).double()  # [T, D]
            k_step = torch.tensor([s for _, s in kq], dtype=torch.float64)
            qmk = (ks * q_mean).sum(-1)  # [T] the exact mean-query term
            for m in range(-(-T // query_block)):
                n_blocks = -(-min(T, (m + 1) * query_block) // bs)
                N = n_blocks - sink - 1
                segs = -(-N // S)
                remain = N - segs * S
                segs = max(0, segs - -(-(L - remain) // S))
                start = sink + 1 + segs * S
                forced = {sink, *range(start, n_blocks)}
                chosen = set()
                for r in range(m * query_block, min((m + 1) * query_block, T)):
                    if not valid[b, r]:
                        continue
                    keys = [t for kb in forced for t in range(kb * bs, min((kb + 1) * bs, r + 1)) if valid[b, t]]
                    lse = float(torch.logsumexp((ks[keys] * q[b, h, r].double()).sum(-1) * scale, 0))
                    qi, sq = quant((q[b, h, r].double() - q_mean).float())
                    est = (sq * k_step * (k_int * qi.double()).sum(-1) + qmk) * scale  # [T] every key's estimate
                    est = est.masked_fill(~valid[b], -math.inf)
                    for kb in range(sink + 1, start):
                        if float(est[kb * bs : (kb + 1) * bs].max()) > lse + math.log(tau):
                            chosen.add(kb)
                out[b, h, m] = {kb for kb in forced | chosen if bool(valid[b, kb * bs : (kb + 1) * bs].any())}
                picked[b, h, m] = chosen, set(range(sink + 1, start))
    return out, picked


@pytest.mark.parametrize("T", [512, 500])
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
def test_paper_selection_equals_reference_loop(T, padded):
    H, Hkv = 4, 2
    g = torch.Generator().manual_seed(T + H)
    u = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    noise = torch.randn(2, H, T, 16, generator=g)
    q = 3 * u + noise - (noise @ u)[..., None] * u  # every query: 3 along u
    spread = (0.4 + torch.rand(-(-T // 16), generator=g)).repeat_interleave(16)[:T, None]  # per key block
    k = torch.randn(2, Hkv, T, 16, generator=g) * spread
    pad = 41 if padded else 0
    k[:, :, pad] = 10 * u  # a heavy first real key (score 7.5), so some blocks pass tau and some do not
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :pad] = False
    key_valid = valid if padded else None
    bs, qb, seg, local, tau = 16, 32, 32, 32, 0.02
    method = make("sale", threshold=tau, block_size=bs, query_block=qb, segment=seg, local_window=local)
    assert method.params.causal is False
    sup = method.support(q, k, LayerContext(0, q.shape[-1] ** -0.5, key_valid=key_valid))
    assert sup.row_mask is None  # one union per query block, as the reference
    mask = sup.to_mask(-(-T // bs))
    ref, picked = naive_sale(q, k, bs, qb, seg, local, tau, 4, key_valid)
    n_chosen, n_cand = (sum(len(v[i]) for v in picked.values()) for i in (0, 1))
    assert 0.1 * n_cand < n_chosen < 0.9 * n_cand, (n_chosen, n_cand)  # the test must select and skip
    for j in range(mask.shape[2]):
        for b in range(2):
            for h in range(H):
                want = {kb for kb in ref[b, h, j * bs // qb] if kb <= j}
                assert set(torch.nonzero(mask[b, h, j]).flatten().tolist()) == want, (b, h, j)


def test_paper_selection_of_a_planted_pattern():
    """Written out by hand: the question (the last 32 queries) attends key 100 (block 3), and so, through the
    union of its 64-row query block, do the 32 queries before it; the causal form gives it to the question's
    own rows only.

    Every query shares a direction with the sink key 0, which scores 8, so every row's sink + local log-sum-exp
    is about 8; key 100 scores 12 with the question's queries (relative score e^4) and about 0 with the others,
    random keys about 0 (relative score e^-8 < tau = 0.004)."""
    T, bs, D = 512, 32, 32
    g = torch.Generator().manual_seed(15)
    u, w = torch.eye(D)[0], torch.eye(D)[1]
    q, k = 0.1 * torch.randn(1, 1, T, D, generator=g), 0.1 * torch.randn(1, 1, T, D, generator=g)
    q[..., 0] = 0.0
    scale = D**-0.5
    q += w * 2.0  # 2 w . 4 sqrt(D) w * scale = 8
    k[:, :, 0] = 4 * D**0.5 * w
    k[:, :, 100] = 4 * D**0.5 * u
    q[:, :, -32:] += 3 * u  # 3 u . 4 sqrt(D) u * scale = 12
    ctx = LayerContext(0, scale)
    method = make("sale")  # the reference's defaults: blocks of 32, query blocks of 64, segments of 128
    mask = method.support(q, k, ctx).to_mask(T // bs)[0, 0]
    # query block 7 (grid blocks 14, 15) ends at key block 16: sink 0, local 9..15 (7 blocks), candidates 1..8
    assert set(torch.nonzero(mask[15]).flatten().tolist()) == {0, 3, *range(9, 16)}
    assert set(torch.nonzero(mask[14]).flatten().tolist()) == {0, 3, *range(9, 15)}
    # query block 6 (grid blocks 12, 13): sink 0, local 9..13, candidates 1..8, none above tau
    assert set(torch.nonzero(mask[13]).flatten().tolist()) == {0, *range(9, 14)}
    # key block 3 is a candidate of query blocks 4..6 (grid blocks 8..13), local before; none keeps it
    assert not mask[8:14, 3].any()
    # causal=True: per-row masks; the question's rows keep block 3, the rows of block 14 do not see it
    sup = make("sale", causal=True).support(q, k, ctx)
    own = support_masks(sup, T // bs)[1][0, 0]  # [NQ, bs, NK]
    assert own[15, :, 3].all() and not own[14, :, 3].any()


def test_defaults_are_the_references():
    p = make("sale").params
    assert (p.bits, p.threshold, p.block_size, p.query_block, p.segment, p.local_window, p.sink_blocks, p.causal) == (
        4, 0.004, 32, 64, 128, 128, 1, False)


CASES = {  # B, H, Hkv, T, window, left padding of row 0
    "gqa": (1, 4, 2, 200, None, 0),
    "mha-pad": (2, 2, 2, 160, None, 23),
    "window": (1, 2, 1, 200, 70, 0),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bits", [4, 8])
def test_selection_equals_naive_loop(case, bits, monkeypatch):
    B, H, Hkv, T, window, pad = CASES[case]
    q, k, _ = qkv(B, H, Hkv, T, seed=T + bits)
    valid = None
    if pad:
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[0, :pad] = False
    p = sale_mod.SaleParams(bits=bits, threshold=0.02, block_size=16, local_window=32, causal=True)
    # Small estimate steps: several row chunks, each smoothed with the means before it.
    monkeypatch.setattr(sale_mod, "ESTIMATE_ELEMS", (H // Hkv) * 16 * T * 4)
    sup = make("sale", **vars(p)).support(q, k, LayerContext(0, q.shape[-1] ** -0.5, window, valid))
    union, own = support_masks(sup, -(-T // 16))
    ref_union, ref_own = naive_selection(q, k, p, key_valid=valid, window=window, chunk_blocks=4)
    if case == "gqa":  # rows of a block disagree, so the per-row (causal) choice is exercised
        assert (ref_union & ~ref_own.all(3)).any()
    assert torch.equal(union, ref_union)
    assert torch.equal(own, ref_own)


def test_quantised_estimate_error_falls_from_4_to_8_bits():
    q, k, _ = qkv(T=512, D=64, seed=1)
    q, k = q[0, 0], k[0, 0]
    exact = q @ k.T
    errs = {}
    for bits in (4, 8):
        for smooth in (False, True):
            qm, km = (q.mean(0), k.mean(0)) if smooth else (torch.zeros(64), torch.zeros(64))
            qi, sq = quantize(q - qm, bits)
            ki, sk = quantize(k - km, bits)
            est = (qi.float() @ ki.float().T) * sq[:, None] * sk[None, :] + (qm @ (k - km).T) + (q @ km)[:, None]
            errs[bits, smooth] = float((est - exact).norm() / exact.norm())
    assert errs[8, True] < errs[4, True] / 8, errs  # ~16x finer steps
    assert errs[4, True] < errs[4, False], errs  # smoothing removes the shared offset before quantising


def test_selection_errors_fall_from_4_to_8_bits(monkeypatch):
    """Against the same rule on exact scores, the 8-bit selection disagrees on fewer (row, block) pairs."""
    p = sale_mod.SaleParams(threshold=0.05, block_size=16, local_window=32, causal=True)
    monkeypatch.setattr(sale_mod, "ESTIMATE_ELEMS", 2 * 16 * 256 * 4)
    wrong = {4: 0, 8: 0}
    for seed in (7, 8):
        q, k, _ = qkv(H=2, Hkv=1, T=256, seed=seed)
        ctx = LayerContext(0, q.shape[-1] ** -0.5)
        exact = naive_selection(q, k, p, chunk_blocks=4, exact=True)[1]
        for bits in (4, 8):
            own = support_masks(make("sale", **{**vars(p), "bits": bits}).support(q, k, ctx), 16)[1]
            wrong[bits] += int((own != exact).sum())
    assert wrong[8] < wrong[4], wrong


@pytest.mark.parametrize("causal", [False, True], ids=["paper", "causal"])
@pytest.mark.parametrize("density", [None, 0.3])
@pytest.mark.parametrize("window", [None, 60], ids=["global", "sliding60"])
def test_executed_attention_equals_masked_dense(density, window, causal):
    q, k, v = qkv(B=2, H=4, Hkv=2, T=180, seed=3)
    valid = torch.ones(2, 180, dtype=torch.bool)
    valid[1, :30] = False
    ctx = LayerContext(0, q.shape[-1] ** -0.5, window, valid)
    method = make("sale", threshold=0.02, density=density, block_size=16, local_window=32, segment=32,
                  calib_chunks=4, causal=causal)
    res = method.prefill(q, k, v, ctx)
    union, own = support_masks(method.support(q, k, ctx), -(-180 // 16))
    pos = torch.arange(180)
    allowed = own.repeat_interleave(16, -1)[..., :180].reshape(2, 4, -1, 180)[:, :, :180]
    allowed = allowed & (pos[None, :] <= pos[:, None]) & valid[:, None, None, :]
    if window is not None:
        allowed = allowed & (pos[:, None] - pos[None, :] < window)
    ref, _ = masked_dense_reference(q, k, v, allowed)
    assert_close(res.out[0], ref[0])
    assert_close(res.out[1, :, 30:], ref[1, :, 30:])
    # Computed cells: every real (query, key) cell of the union's blocks.
    cells_mask = union.repeat_interleave(16, -1)[..., :180].repeat_interleave(16, 2)[:, :, :180]
    cells_mask = cells_mask & (pos[None, :] <= pos[:, None]) & valid[:, None, None, :] & valid[:, None, :, None]
    if window is not None:
        cells_mask = cells_mask & (pos[:, None] - pos[None, :] < window)
    assert res.cells == int(cells_mask.sum())


def structured(T=2048, D=32, seed=0, q_scale=2.0, sink=3.0, k_bias=1.0):
    """Queries correlated along the sequence, a heavy first key: attention like a real LM."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 1, 1, D, generator=g)
    q = (base + 0.5 * torch.randn(1, 4, T, D, generator=g)) * q_scale
    k = torch.randn(1, 1, T, D, generator=g) + k_bias * torch.randn(1, 1, 1, D, generator=g)
    k[:, :, 0] = base[0, 0] * sink
    return q, k, torch.randn(1, 1, T, D, generator=g)


@pytest.mark.parametrize("causal", [False, True], ids=["paper", "causal"])
@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_lands_near_target(density, causal):
    q, k, v = structured()
    method = make("sale", density=density, block_size=16, local_window=32, segment=32, causal=causal)
    res = method.prefill(q, k, v, LayerContext(0, 32**-0.5))
    measured = res.cells / (4 * exact_cells(2048, 2048))
    # sink + local blocks are a floor of about 0.05 here; counts are whole blocks
    assert 0.7 * density <= measured <= 1.3 * density + 0.02, measured


@pytest.mark.parametrize("causal", [False, True], ids=["paper", "causal"])
def test_threshold_trades_blocks_for_accuracy(causal):
    q, k, v = structured(T=1024, seed=1, q_scale=3.0, sink=1.0, k_bias=0.0)
    ctx = LayerContext(0, 32**-0.5)
    ref, _ = dense_attention(q, k, v)
    runs = [make("sale", threshold=t, block_size=16, local_window=32, segment=32, causal=causal).prefill(q, k, v, ctx)
            for t in (0.1, 0.01, 0.001)]
    cells = [r.cells for r in runs]
    errs = [float((r.out - ref).norm() / ref.norm()) for r in runs]
    assert cells[0] < cells[1] < cells[2], cells
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.01, errs


def test_no_causal_leak_with_several_smoothing_chunks(monkeypatch):
    monkeypatch.setattr(sale_mod, "ESTIMATE_ELEMS", 2 * 16 * 400 * 3)
    method = make("sale", threshold=0.02, block_size=16, local_window=32, causal=True)
    q, k, v = qkv(H=4, Hkv=2, T=400, seed=5)
    ctx = LayerContext(0, q.shape[-1] ** -0.5)
    base = method.prefill(q, k, v, ctx).out
    for t in (40, 170, 399):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, t:] += 3
        k2[:, :, t:] -= 2
        v2[:, :, t:] *= -1
        assert_close(method.prefill(q2, k2, v2, ctx).out[:, :, :t], base[:, :, :t], what=f"before {t}")


@pytest.mark.parametrize(
    "key,value",
    [("bits", 3), ("threshold", 1.5), ("density", 0.0), ("block_size", 8), ("local_window", 0),
     ("sink_blocks", -1), ("calib_chunks", 0), ("query_block", 48), ("segment", 100)],
)
def test_bad_parameters_raise_value_error_naming_the_value(key, value):
    with pytest.raises(ValueError, match=key):
        make("sale", **{key: value})

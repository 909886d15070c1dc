"""SALE: low-bit estimates, the relative-score selection against a naive loop, and the executed attention."""

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
    """(union [B, H, NQ, NK], per-row blocks [B, H, NQ, bs, NK]) from a BlockSupport with row_mask."""
    union = sup.to_mask(n_k)
    blocks = sup.blocks
    own = torch.zeros(*blocks.shape[:3], sup.row_mask.shape[3], n_k + 1, dtype=torch.bool)
    idx = torch.where(blocks >= 0, blocks, n_k)[:, :, :, None, :].expand_as(sup.row_mask)
    own.scatter_(4, idx, sup.row_mask)
    return union, own[..., :n_k]


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
    p = sale_mod.SaleParams(bits=bits, threshold=0.02, block_size=16, local_window=32)
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
    p = sale_mod.SaleParams(threshold=0.05, block_size=16, local_window=32)
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


@pytest.mark.parametrize("density", [None, 0.3])
@pytest.mark.parametrize("window", [None, 60], ids=["global", "sliding60"])
def test_executed_attention_equals_masked_dense(density, window):
    q, k, v = qkv(B=2, H=4, Hkv=2, T=180, seed=3)
    valid = torch.ones(2, 180, dtype=torch.bool)
    valid[1, :30] = False
    ctx = LayerContext(0, q.shape[-1] ** -0.5, window, valid)
    method = make("sale", threshold=0.02, density=density, block_size=16, local_window=32, calib_chunks=4)
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


@pytest.mark.parametrize("density", [0.1, 0.2, 0.4])
def test_density_lands_near_target(density):
    q, k, v = structured()
    res = make("sale", density=density, block_size=16, local_window=32).prefill(q, k, v, LayerContext(0, 32**-0.5))
    measured = res.cells / (4 * exact_cells(2048, 2048))
    # sink + local blocks are a floor of about 0.05 here; counts are whole blocks
    assert 0.7 * density <= measured <= 1.3 * density + 0.02, measured


def test_threshold_trades_blocks_for_accuracy():
    q, k, v = structured(T=1024, seed=1, q_scale=3.0, sink=1.0, k_bias=0.0)
    ctx = LayerContext(0, 32**-0.5)
    ref, _ = dense_attention(q, k, v)
    runs = [make("sale", threshold=t, block_size=16, local_window=32).prefill(q, k, v, ctx) for t in (0.1, 0.01, 0.001)]
    cells = [r.cells for r in runs]
    errs = [float((r.out - ref).norm() / ref.norm()) for r in runs]
    assert cells[0] < cells[1] < cells[2], cells
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 0.01, errs


def test_no_causal_leak_with_several_smoothing_chunks(monkeypatch):
    monkeypatch.setattr(sale_mod, "ESTIMATE_ELEMS", 2 * 16 * 400 * 3)
    method = make("sale", threshold=0.02, block_size=16, local_window=32)
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
     ("sink_blocks", -1), ("calib_chunks", 0)],
)
def test_bad_parameters_raise_value_error_naming_the_value(key, value):
    with pytest.raises(ValueError, match=key):
        make("sale", **{key: value})

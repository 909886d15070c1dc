"""The token-gather kernel against dense attention with the explicit mask its lists imply."""

from __future__ import annotations

import importlib

import pytest
import torch

from attnsieve.kernels import BlockSupport, block_grid, block_sparse_attention, compiled, merge, support_attention
from attnsieve.kernels.host_syncs import count_host_syncs
from attnsieve.kernels.token_gather import drop_covered, token_gather_attention

from helpers import assert_close, masked_dense_reference

# the module, not the function of the same name that attnsieve.kernels exports
support_attention_module = importlib.import_module("attnsieve.kernels.support_attention")


def lists_to_mask(tokens, H, Tq, Tk, bs, causal=True, window=None, key_valid=None, row_mask=None):
    """[B, H, Tq, Tk] bool mask built by looping over the lists (slow and obvious)."""
    B, Hs, NQ, M = tokens.shape
    Gs = H // Hs
    first, _, _ = block_grid(Tq, Tk, bs)
    mask = torch.zeros(B, H, Tq, Tk, dtype=torch.bool)
    for b in range(B):
        for hs in range(Hs):
            for j in range(NQ):
                for r in range(Gs * bs):
                    g, off = divmod(r, bs)
                    p = (first + j) * bs + off  # absolute query position
                    i = p - (Tk - Tq)
                    if not 0 <= i < Tq:
                        continue
                    for m in range(M):
                        t = int(tokens[b, hs, j, m])
                        if t < 0 or (row_mask is not None and not row_mask[b, hs, j, r, m]):
                            continue
                        if causal and t > p or window is not None and p - t >= window:
                            continue
                        if key_valid is not None and not (key_valid[b, t] and key_valid[b, p]):
                            continue
                        mask[b, hs * Gs + g, i, t] = True
    return mask


TOKEN_BACKENDS = ["compiled", "torch"] if compiled.available() else ["torch"]


def random_lists(B, Hs, NQ, M, Tk, seed):
    g = torch.Generator().manual_seed(seed)
    tok = torch.stack([torch.randperm(Tk, generator=g)[:M] for _ in range(B * Hs * NQ)]).view(B, Hs, NQ, M)
    drop = torch.rand(B, Hs, NQ, M, generator=g) < 0.3
    return torch.where(drop, -1, tok)


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (37, 37), (70, 70), (20, 90)], ids=lambda x: str(x))
@pytest.mark.parametrize("heads,Hs", [((4, 1), 1), ((4, 1), 4), ((4, 2), 2)], ids=["group", "perhead", "gqa2"])
@pytest.mark.parametrize("window", [None, 25], ids=["global", "win25"])
@pytest.mark.parametrize("backend", TOKEN_BACKENDS)
def test_token_gather_equals_masked_dense(Tq, Tk, heads, Hs, window, backend):
    H, Hkv = heads
    bs = 16
    g = torch.Generator().manual_seed(Tq * 7 + Tk)
    q = torch.randn(2, H, Tq, 8, generator=g)
    k, v = torch.randn(2, Hkv, Tk, 8, generator=g), torch.randn(2, Hkv, Tk, 8, generator=g)
    _, n_q, _ = block_grid(Tq, Tk, bs)
    tokens = random_lists(2, Hs, n_q, min(Tk, 12), Tk, seed=Tq)
    valid = torch.ones(2, Tk, dtype=torch.bool)
    valid[1, : Tk // 3] = False
    res = token_gather_attention(q, k, v, tokens, bs, window=window, key_valid=valid, chunk_elems=2000, backend=backend)
    mask = lists_to_mask(tokens, H, Tq, Tk, bs, window=window, key_valid=valid)
    ref, ref_lse = masked_dense_reference(q, k, v, mask)
    rows = mask.any(-1)
    assert_close(res.out[rows], ref[rows])
    assert_close(res.lse[rows], ref_lse[rows])
    assert bool((res.lse[~rows] == float("-inf")).all())
    assert res.cells == int(mask.sum())


@pytest.mark.parametrize("backend", TOKEN_BACKENDS)
def test_token_gather_row_mask_restricts_rows(backend):
    H, Hs, T, bs = 4, 1, 48, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, H, T, 8, generator=g), torch.randn(1, 1, T, 8, generator=g), torch.randn(1, 1, T, 8)
    tokens = random_lists(1, Hs, 3, 10, T, seed=5)
    row_mask = torch.rand(1, Hs, 3, H * bs, 10, generator=g) < 0.5
    res = token_gather_attention(q, k, v, tokens, bs, row_mask=row_mask, backend=backend)
    mask = lists_to_mask(tokens, H, T, T, bs, row_mask=row_mask)
    ref, _ = masked_dense_reference(q, k, v, mask)
    rows = mask.any(-1)
    assert_close(res.out[rows], ref[rows])
    assert res.cells == int(mask.sum())


def test_token_part_merges_with_block_part_after_drop_covered():
    """Blocks + tokens (made disjoint) merge into attention over their union."""
    H, T, bs = 2, 64, 16
    g = torch.Generator().manual_seed(9)
    q, k, v = torch.randn(1, H, T, 8, generator=g), torch.randn(1, H, T, 8, generator=g), torch.randn(1, H, T, 8)
    blocks = torch.tensor([[0, -1], [1, -1], [2, 0], [3, 1]]).expand(1, H, 4, 2).clone()
    support = BlockSupport(blocks, bs)
    tokens = random_lists(1, H, 4, 20, T, seed=2)
    tokens = drop_covered(tokens, support)
    blk = torch.where(tokens >= 0, tokens // bs, -9)
    assert not bool((blk[..., :, None] == blocks[..., None, :]).any())
    a = block_sparse_attention(q, k, v, support)
    b = token_gather_attention(q, k, v, tokens, bs)
    out, _ = merge(a.out, a.lse, b.out, b.lse)
    support_mask = torch.zeros(1, H, T, T, dtype=torch.bool)
    for j in range(4):
        for kb in blocks[0, 0, j].tolist():
            if kb >= 0:
                support_mask[:, :, j * bs : (j + 1) * bs, kb * bs : (kb + 1) * bs] = True
    mask = (support_mask | lists_to_mask(tokens, H, T, T, bs)) & torch.ones(T, T, dtype=torch.bool).tril()
    ref, _ = masked_dense_reference(q, k, v, mask)
    assert_close(out, ref)
    assert a.cells + b.cells == int(mask.sum())


def test_token_gather_rejects_bad_lists():
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        token_gather_attention(q, k, k, torch.zeros(1, 2, 2, 4, dtype=torch.long), 16, backend="gpu")
    with pytest.raises(ValueError, match="tokens must be"):
        token_gather_attention(q, k, k, torch.zeros(1, 2, 3, 4, dtype=torch.long), 16)
    with pytest.raises(ValueError, match="< Tk=32"):
        token_gather_attention(q, k, k, torch.full((1, 2, 2, 4), 40), 16)


@pytest.mark.parametrize("Tq,Tk", [(64, 64), (100, 100), (30, 100)], ids=lambda x: str(x))
@pytest.mark.parametrize("block_heads,token_heads", [(1, 4), (4, 1), (2, 2)], ids=["b-group", "t-group", "same"])
@pytest.mark.parametrize("route", ["runs", "one-call"])
def test_support_attention_runs_blocks_and_tokens_once_each(Tq, Tk, block_heads, token_heads, route, monkeypatch):
    """A support with blocks and tokens (overlapping, repeated, other head counts) equals dense
    attention over their union, with every cell counted once: on the compiled token kernel's per-head
    runs (CPU) and on the torch kernel's single call (GPU, or no compiled kernel)."""
    if route == "runs" and not compiled.available():
        pytest.skip("compiled kernel unavailable")
    monkeypatch.setattr(support_attention_module, "_token_kernel_compiled", lambda q: route == "runs")
    H, Hkv, bs = 4, 1 if 1 in (block_heads, token_heads) else 2, 16
    g = torch.Generator().manual_seed(Tq + Tk + block_heads)
    q = torch.randn(2, H, Tq, 8, generator=g)
    k, v = torch.randn(2, Hkv, Tk, 8, generator=g), torch.randn(2, Hkv, Tk, 8, generator=g)
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    block_mask = torch.rand(2, block_heads, n_q, n_k, generator=g) < 0.3
    tokens = random_lists(2, token_heads, n_q, 10, Tk, seed=Tk)
    tokens[..., -1] = tokens[..., 0]  # a repeated token is attended and counted once
    valid = torch.ones(2, Tk, dtype=torch.bool)
    valid[1, : Tk // 4] = False
    support = BlockSupport.from_mask(block_mask, bs)
    support = BlockSupport(support.blocks, bs, tokens=tokens)
    res = support_attention(q, k, v, support, key_valid=valid)

    q_pos = torch.arange(Tk - Tq, Tk)
    block_of_q = q_pos // bs - first
    blocks_tok = block_mask.repeat_interleave(H // block_heads, dim=1)[:, :, block_of_q]  # [B, H, Tq, NK]
    mask = blocks_tok[..., torch.arange(Tk) // bs]
    mask |= lists_to_mask(tokens, H, Tq, Tk, bs)
    mask &= (torch.arange(Tk)[None, :] <= q_pos[:, None]) & valid[:, None, None, :] & valid[:, None, Tk - Tq :, None]
    ref, ref_lse = masked_dense_reference(q, k, v, mask)
    rows = mask.any(-1)
    assert_close(res.out[rows], ref[rows])
    assert_close(res.lse[rows], ref_lse[rows])
    assert res.cells == int(mask.sum())


def test_support_attention_refuses_tokens_in_bidirectional_layers():
    q = torch.randn(1, 2, 32, 8)
    zeros = torch.zeros(1, 2, 2, 1, dtype=torch.long)
    support = BlockSupport(zeros, 16, tokens=zeros)
    with pytest.raises(ValueError, match="causal layers only"):
        support_attention(q, q, q, support, causal=False)


def test_support_attention_token_path_syncs_do_not_grow_with_heads_or_blocks(monkeypatch):
    """On the torch route (a GPU's), a fixed number of host syncs whatever the heads and blocks."""
    monkeypatch.setattr(support_attention_module, "_token_kernel_compiled", lambda q: False)
    counts = []
    for H, T in ((2, 128), (8, 1024)):
        g = torch.Generator().manual_seed(H)
        q, k, v = (torch.randn(1, H, T, 8, generator=g) for _ in range(3))
        first, n_q, n_k = block_grid(T, T, 16)
        support = BlockSupport.from_mask(torch.rand(1, H, n_q, n_k, generator=g) < 0.2, 16)
        support = BlockSupport(support.blocks, 16, tokens=random_lists(1, H, n_q, 10, T, seed=T))
        with count_host_syncs(q, k, v, support.blocks, support.tokens) as s:
            support_attention(q, k, v, support, backend="matmul")
        counts.append(s.count)
    assert counts[0] == counts[1] <= 8, counts

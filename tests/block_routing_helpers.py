"""Inputs and the block-mask-to-token-mask expansion shared by the block-routing method tests."""

from __future__ import annotations

import torch

from attnsieve.methods import LayerContext


def qkv(B=1, H=4, Hkv=1, T=300, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    return q, torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)


def ctx_for(q, key_valid=None, window=None):
    return LayerContext(0, q.shape[-1] ** -0.5, window, key_valid)


def token_mask_from_blocks(block_mask, H, T, bs, valid):
    """[B, H, T, T] token mask implied by a block mask [B, Hs, NQ, NK] (causal, padding excluded)."""
    B, Hs = block_mask.shape[:2]
    blk = block_mask.repeat_interleave(H // Hs, 1)
    tok = blk.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :T, :T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return tok & causal & valid[:, None, None, :]

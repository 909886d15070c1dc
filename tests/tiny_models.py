"""Tiny random-init models built in the tests (no downloads)."""

from __future__ import annotations

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

VOCAB = 97


def tiny_gemma3(sliding_window: int = 24, seed: int = 0):
    """Gemma-3 layout: sliding and global layers, 4 query heads sharing 1 KV head."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=1024, attn_implementation="sdpa", pad_token_id=0,
    )
    return Gemma3ForCausalLM(cfg).eval()


def tiny_llama(seed: int = 0):
    """Llama layout: global layers only, grouped-query attention (6 heads, 2 KV heads)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
        attn_implementation="sdpa", pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


MODELS = {"gemma3": tiny_gemma3, "llama": tiny_llama}

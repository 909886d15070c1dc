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


def tiny_tokenizer():
    """A byte-level tokenizer built in code (259 tokens, no merges): any text encodes, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(sorted(chars))}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def save_tiny_eval_model(folder, seed: int = 0):
    """A tiny Gemma-3 and its byte-level tokenizer saved as an HF folder (`--model FOLDER` in the CLI)."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=2048, attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    Gemma3ForCausalLM(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder

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


NEEDLE = 5  # the token tiny_llama_retrieval's planted layer retrieves


def _needle_llama(n_layers: int, seed: int):
    """(model, head_dim, heads, kv_heads, slow): a random tiny Llama (every layer global) in which only
    the NEEDLE token's embedding has residual coordinate 0 and no layer writes it; `slow` is the
    rotary dimension whose pair (slow, slow + hd/2) turns slowest."""
    torch.manual_seed(seed)
    hd, heads, kv_heads = 16, 4, 2
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hd, attention_bias=True,
        max_position_embeddings=1024, attn_implementation="sdpa", pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0
        emb[NEEDLE] = 0
        emb[NEEDLE, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
    return model, hd, heads, kv_heads, hd // 2 - 1


def tiny_llama_retrieval(sensitive: int = 2, n_layers: int = 4, seed: int = 0):
    """Llama layout, every layer global; layer `sensitive` is a planted retrieval layer.

    Every query of that layer attends (almost only) to the NEEDLE token wherever it sits, however far
    back: its queries carry a constant bias and its keys the needle's own embedding coordinate in
    the slowest rotary pair (RoPE turns it by < 0.1 rad over 256 tokens), and no layer writes that
    coordinate of the residual stream, so only the needle's key matches. Its values and output are
    scaled up so the retrieved vector moves the logits; the other layers stay random (diffuse).
    """
    model, hd, heads, kv_heads, slow = _needle_llama(n_layers, seed)
    with torch.no_grad():
        attn = model.model.layers[sensitive].self_attn
        for h in range(kv_heads):
            attn.k_proj.weight[h * hd + slow] = 0
            attn.k_proj.weight[h * hd + slow, 0] = 3.0
            attn.k_proj.bias[h * hd + slow] = 0
        for h in range(heads):
            attn.q_proj.weight[h * hd + slow] = 0
            attn.q_proj.bias[h * hd + slow] = 3.0
        attn.v_proj.weight[:, 0] = torch.randn(attn.v_proj.weight.shape[0]) * 0.5
        attn.o_proj.weight *= 10
        attn.o_proj.weight[0] = 0
        model.lm_head.weight *= 10  # peaked next-token distributions: KL and top-1 mean something
    return model


def tiny_llama_retrieval_head(layer: int = 2, head: int = 1, n_layers: int = 4, seed: int = 0):
    """As tiny_llama_retrieval, but only query head `head` of layer `layer` retrieves the NEEDLE.

    Its siblings (the other query heads of that layer, one of them reading the same KV head) and every
    other layer stay random and diffuse: only that head's queries carry the bias, and only its output
    columns are scaled up, so its output (the needle's value) dominates the layer's.
    """
    model, hd, heads, kv_heads, slow = _needle_llama(n_layers, seed)
    kv = head // (heads // kv_heads)
    with torch.no_grad():
        attn = model.model.layers[layer].self_attn
        attn.k_proj.weight[kv * hd + slow] = 0
        attn.k_proj.weight[kv * hd + slow, 0] = 3.0
        attn.k_proj.bias[kv * hd + slow] = 0
        attn.q_proj.weight[head * hd + slow] = 0
        attn.q_proj.bias[head * hd + slow] = 3.0
        attn.v_proj.weight[kv * hd : (kv + 1) * hd, 0] = torch.randn(hd) * 0.5
        attn.o_proj.weight[:, head * hd : (head + 1) * hd] *= 10
        attn.o_proj.weight[0] = 0
        model.lm_head.weight *= 10  # peaked next-token distributions: KL and top-1 mean something
    return model


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

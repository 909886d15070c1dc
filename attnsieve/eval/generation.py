"""Timed prefill and greedy decoding with the model's KV cache.

Prefill is one forward pass over the prompt computing only the last position's logits (the
262k-token vocabulary makes full logits 8 GB at 8k tokens); decoding then feeds one token at a
time through the cache. Times are wall-clock seconds of this process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from attnsieve.eval.efficiency import kv_cache_bytes
from attnsieve.methods.base import estimate_clock


@dataclass
class Generation:
    tokens: list[int]
    text: str
    prefill_s: float
    decode_s: float
    kv_cache_bytes: int = 0  # bytes of the KV cache right after prefill
    decode_attn_s: float | None = None  # of decode_s, inside the attention modules (with a timer)
    cache: Any = field(default=None, repr=False)  # the cache after the turn, where a next turn continues
    last: torch.Tensor | None = field(default=None, repr=False)  # the last generated token, not yet fed

    @property
    def decode_ms_per_token(self) -> float | None:
        steps = len(self.tokens) - 1  # the first token comes from the prefill logits
        return 1000 * self.decode_s / steps if steps > 0 else None

    @property
    def decode_attn_ms_per_token(self) -> float | None:
        steps = len(self.tokens) - 1
        return 1000 * self.decode_attn_s / steps if steps > 0 and self.decode_attn_s is not None else None


def context_then_question(model, input_ids: torch.Tensor, context_len: int):
    """Prefill the context alone, freeze its compressed cache, then prefill the question over it."""
    if not 0 < context_len < input_ids.shape[1]:
        raise ValueError(f"context_len must be in [1, {input_ids.shape[1] - 1}], got {context_len}")
    out = model(input_ids[:, :context_len], use_cache=True, logits_to_keep=1)
    if not hasattr(out.cache, "freeze"):
        raise ValueError("query-agnostic mode needs a KV-cache policy (transformers' DynamicCache has no freeze)")
    out.cache.freeze()
    return model(input_ids[:, context_len:], cache=out.cache, use_cache=True, logits_to_keep=1)


@torch.no_grad()
def greedy(model, tok, input_ids: torch.Tensor, max_new_tokens: int, attention_mask=None,
           context_len: int | None = None, timer=None) -> Generation:
    """Greedy continuation of a batch-1 prompt; stops at EOS or after `max_new_tokens` tokens.

    `context_len` (query-agnostic KV compression, with a KV policy patched in): the first
    `context_len` tokens are prefilled and compressed alone, the cache is frozen, and the rest of
    the prompt (the question) is prefilled over it as a continuation; both count as prefill.
    `timer` (an entered efficiency.AttentionTimer) measures the attention modules' share of decoding."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if context_len is not None and attention_mask is not None:
        raise ValueError("context_len runs unpadded batch-1 prompts only")
    input_ids = input_ids.to(model.device)  # a model loaded on a GPU takes its prompt there
    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)
    t0 = estimate_clock(input_ids)
    if context_len is None:
        out = model(input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
    else:
        out = context_then_question(model, input_ids, context_len)
    prefill_s = estimate_clock(input_ids) - t0  # on a GPU: after its kernels finish
    cache_bytes = kv_cache_bytes(out.cache)
    tokens, text, decode_s, attn_s, out, nxt = _decode(model, tok, out, max_new_tokens, attention_mask, timer)
    return Generation(tokens, text, prefill_s, decode_s, cache_bytes, attn_s, out.cache, nxt)


def _decode(model, tok, out, max_new_tokens: int, attention_mask=None, timer=None):
    """Greedy decoding after a prefill's `out`: (tokens, text, seconds, attention seconds or None, last
    forward's output, the last token, not yet fed); stops at EOS or after `max_new_tokens` tokens."""
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    eos = {t for t in [tok.eos_token_id, *(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])] if t is not None}
    tokens: list[int] = []
    if timer is not None:
        timer.seconds.clear()
        timer.on = True
    t1 = time.perf_counter()
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    while len(tokens) < max_new_tokens:
        tokens.append(int(nxt))
        if tokens[-1] in eos or len(tokens) == max_new_tokens:
            break
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(1, 1)], dim=1)
        out = model(nxt, cache=out.cache, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    decode_s = time.perf_counter() - t1
    attn_s = None
    if timer is not None:
        timer.on = False
        attn_s = timer.total()
    text = tok.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
    return tokens, text, decode_s, attn_s, out, nxt


@torch.no_grad()
def next_turn(model, tok, prev: Generation, question_ids: list[int], max_new_tokens: int) -> Generation:
    """One more turn on `prev`'s cache: its last token (never fed) and the question are prefilled over
    the cache, then the answer is decoded greedily. A policy cache compresses the chunk as its policy
    does (query-aware), or stores it as it comes once frozen (query-agnostic)."""
    question = torch.tensor([question_ids], dtype=prev.last.dtype, device=prev.last.device)
    ids = torch.cat([prev.last.view(1, 1), question], dim=1)
    t0 = estimate_clock(prev.last)
    out = model(ids, cache=prev.cache, use_cache=True, logits_to_keep=1)
    prefill_s = estimate_clock(prev.last) - t0
    tokens, text, decode_s, _, out, nxt = _decode(model, tok, out, max_new_tokens)
    return Generation(tokens, text, prefill_s, decode_s, kv_cache_bytes(out.cache), None, out.cache, nxt)

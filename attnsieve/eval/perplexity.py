"""Perplexity of long text under the patched model, with the output layer computed in chunks.

Full logits of a 262k-token vocabulary would take 8 GB at 8k tokens; the hidden states are
computed once and projected to the vocabulary `chunk` positions at a time.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, chunk: int = 128) -> float:
    """exp(mean next-token NLL) over the sequence (batch of 1)."""
    if input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"perplexity needs a [1, T >= 2] input, got {tuple(input_ids.shape)}")
    base = getattr(model, "model", None)
    head = model.get_output_embeddings()
    if base is None or head is None:
        raise ValueError(f"{type(model).__name__} has no base model + output layer to score text with")
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    hidden = base(input_ids, use_cache=False).last_hidden_state  # [1, T, hidden]
    T = input_ids.shape[1]
    nll = 0.0
    for s in range(0, T - 1, chunk):
        e = min(s + chunk, T - 1)
        logits = head(hidden[:, s:e]).float()  # [1, c, V]
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        nll += float(torch.nn.functional.cross_entropy(logits[0], input_ids[0, s + 1 : e + 1], reduction="sum"))
    return math.exp(nll / (T - 1))

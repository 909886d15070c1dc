"""RazorAttention: retrieval heads keep everything; the others keep sinks, a local buffer and a compensation token.

Retrieval heads are echo heads (attending to the previous occurrence of the current token) and
induction heads (attending to the token that followed it), found once per model on a sequence of
random tokens repeated several times. They keep their whole cache. Every other KV head keeps its
first `kv_sink` tokens and a buffer of the latest max(S0, n / C) tokens (n: tokens seen), and
folds the tokens it drops into one compensation token per head: the mean of the dropped keys and
the mean of their values, whose exponentiated score counts once per dropped token, so the dropped
tokens still contribute as one averaged token. Tang et al., "RazorAttention: Efficient KV Cache
Compression Through Retrieval Heads", ICLR 2025 (arXiv:2407.15891).

Parameters: `kv_echo_ratio` / `kv_induction_ratio` (top 1% echo and top 14% induction heads across
layers, the reference implementation's defaults); `kv_budget` (kind "heads": fraction of KV heads
kept whole; when given it replaces the two ratios, split between echo and induction heads in their
ratio); `kv_sink` (N0 = 4); `kv_recent` (S0, the buffer's floor: 256 as the MindSpore reference's
local capacity, the paper's long-context floor being larger); `kv_compression` (C, the buffer is
max(S0, n / C): 5); `kv_compensation` (the compensation token, on); `kv_calibration` (the dict
`calibrate_razor` returns, its JSON file, or a model name/path whose cached calibration is used).
Heads are scored by `calibrate_razor(model, tok)`: `period` random distinct tokens repeated
`repeats` times (the paper: 2500 x 4; default 512 x 4 on CPU), each head's mean attention, over
the queries of the repeated copies, on earlier occurrences of the query's token (echo) and on the
tokens after them (induction); a KV head takes its best query head's scores. Cached as JSON.
Budget 1.0 keeps every head whole: exactly the dense cache (no calibration needed).
The compensation token's key, value and count are stored (counted in `nbytes()`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from attnsieve.cache._heads import (
    HeadSplitKV,
    head_count,
    int_keys,
    load_calibration,
    top_heads,
)
from attnsieve.cache.base import KVPolicy, KVPolicyParams, register_policy

HOW = ("calibrate once with attnsieve.signals.calibrate_razor(model, tok) (cached per model), then pass "
       "kv_calibration=<model name or path, the JSON file, or the returned dict>")


@dataclass
class RazorParams(KVPolicyParams):
    kv_sink: int = field(default=4, metadata={"help": "N0: first tokens kept by non-retrieval heads (>= 0)"})
    kv_recent: int = field(default=256, metadata={"help": "S0: floor of the non-retrieval heads' buffer (>= 0)"})
    kv_compression: float = field(default=5.0, metadata={"help": "C: buffer = max(S0, tokens / C) (>= 1)"})
    kv_echo_ratio: float = field(default=0.01, metadata={"help": "top fraction of echo heads kept whole, [0, 1]"})
    kv_induction_ratio: float = field(
        default=0.14, metadata={"help": "top fraction of induction heads kept whole, [0, 1]"}
    )
    kv_compensation: bool = field(default=True, metadata={"help": "fold dropped tokens into a compensation token"})
    kv_calibration: str | dict | None = field(
        default=None, metadata={"help": "calibrate_razor's scores: dict, JSON path, or model name/path (cached)"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.kv_compression < 1:
            raise ValueError(f"kv_compression must be >= 1, got {self.kv_compression}")
        for name in ("kv_echo_ratio", "kv_induction_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def retrieval_heads(echo: dict, induction: dict, echo_ratio: float, induction_ratio: float,
                    budget: float | None) -> set[tuple[int, int]]:
    """(layer, KV head) pairs kept whole: top echo heads united with top induction heads.

    Without a budget, the top `echo_ratio` and `induction_ratio` of all heads; with one,
    round(budget * heads) heads, the echo share in proportion to the two ratios.
    """
    n = head_count(echo)
    if budget is None:
        return top_heads(echo, round(echo_ratio * n)) | top_heads(induction, round(induction_ratio * n))
    total = round(budget * n)
    share = echo_ratio / (echo_ratio + induction_ratio) if echo_ratio + induction_ratio > 0 else 0.0
    chosen = top_heads(echo, round(share * total))
    return chosen | top_heads(induction, total - len(chosen), exclude=chosen)


@register_policy(
    "razor",
    kind="heads",
    params=RazorParams,
    summary="RazorAttention: echo/induction heads keep all; others sinks + buffer + one compensation token.",
)
class Razor(KVPolicy):
    def __init__(self, budget, params=None, *, n_layers=1):
        super().__init__(budget, params, n_layers=n_layers)
        p = self.params
        self.retrieval: set[tuple[int, int]] | None = None  # None: every head whole
        self.heads: dict[int, int] = {}
        if not (self.budget_given and self.budget >= 1):
            if p.kv_calibration is None:
                raise ValueError(f"RazorAttention below budget 1.0 needs echo/induction head scores: {HOW}")
            doc = load_calibration("razor", p.kv_calibration, HOW)
            if "echo" not in doc or "induction" not in doc:
                raise ValueError(f"kv_calibration for razor needs 'echo' and 'induction' scores; {HOW}")
            echo, induction = int_keys(doc["echo"]), int_keys(doc["induction"])
            self.heads = {layer: len(v) for layer, v in echo.items()}
            budget = self.budget if self.budget_given else None
            self.retrieval = retrieval_heads(echo, induction, p.kv_echo_ratio, p.kv_induction_ratio, budget)

    def layer(self, layer_idx, rank=0):
        p = self.params

        def buffer(n: int) -> int:
            return max(p.kv_recent, math.ceil(n / p.kv_compression))

        if self.retrieval is None:
            return HeadSplitKV(layer_idx, None, p.kv_sink, buffer)
        if layer_idx not in self.heads:
            raise ValueError(f"the RazorAttention calibration has no scores for layer {layer_idx}; {HOW}")
        kept = {h for (layer, h) in self.retrieval if layer == layer_idx}
        return HeadSplitKV(layer_idx, kept, p.kv_sink, buffer, self.heads[layer_idx], p.kv_compensation)

"""DuoAttention: retrieval heads keep the whole cache, streaming heads only sinks and recent tokens.

Each KV head of the compressed layers is either a retrieval head (every token stored) or a
streaming head (its first `kv_sink` and latest `kv_recent` tokens stored; the rest freed), so the
two kinds hold rows of different real lengths. Xiao et al., "DuoAttention: Efficient Long-Context
LLM Inference with Retrieval and Streaming Heads", ICLR 2025 (arXiv:2410.10819).

Which heads retrieve is calibrated once per model by `calibrate_duo(model, tok)`. The paper
optimises a gate per head by gradient descent on synthetic pass-key data (hours of training); we
use the documented training-free proxy, the retrieval score of Wu et al., "Retrieval Head
Mechanistically Explains Long-Context Factuality" (arXiv:2404.15574): on attnsieve's pass-key
prompts, while the model generates, a head scores each time the generated token is a needle token
and the head's most attended position holds that very token in the needle (copy-paste); the score
is the fraction of such copying steps. A KV head takes its best query head's score (its cache
serves the whole group). Scores are cached as JSON under the attnsieve cache directory, keyed by
model and prompt length; the retrieval heads are the top fraction of all compressed KV heads,
ranked across layers, as the paper's deployment does.

Parameters: `kv_budget` = fraction of KV heads kept whole (kind "heads"); `kv_retrieval_ratio`
overrides it (without either: 0.5, the paper's GQA setting); `kv_sink` (128) and `kv_recent` (256)
as the reference code's released head patterns; `kv_calibration` = the dict `calibrate_duo`
returns, its JSON file, or a model name/path whose cached calibration is used (the longest
length). A ratio below 1 without a calibration raises a ValueError saying how to calibrate (a
policy cannot see the model).
Ratio 1.0 keeps every head whole: exactly the dense cache. The memory kept is about
ratio + (1 - ratio) * (kv_sink + kv_recent) / tokens of the dense cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attnsieve.cache._heads import (
    HeadSplitKV,
    head_count,
    int_keys,
    load_calibration,
    top_heads,
)
from attnsieve.cache.base import KVPolicy, KVPolicyParams, register_policy

HOW = ("calibrate once with attnsieve.signals.calibrate_duo(model, tok) (cached per model), then pass "
       "kv_calibration=<model name or path, the JSON file, or the returned dict>")
DEFAULT_RATIO = 0.5  # the paper's retrieval-head ratio for GQA models


@dataclass
class DuoParams(KVPolicyParams):
    kv_sink: int = field(default=128, metadata={"help": "first tokens kept by streaming heads (>= 0)"})
    kv_recent: int = field(default=256, metadata={"help": "latest tokens kept by streaming heads (>= 0)"})
    kv_retrieval_ratio: float | None = field(
        default=None, metadata={"help": "fraction of KV heads kept whole, [0, 1]; overrides kv_budget (else 0.5)"}
    )
    kv_calibration: str | dict | None = field(
        default=None, metadata={"help": "calibrate_duo's scores: dict, JSON path, or model name/path (cached)"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.kv_retrieval_ratio is not None and not 0 <= self.kv_retrieval_ratio <= 1:
            raise ValueError(f"kv_retrieval_ratio must be in [0, 1], got {self.kv_retrieval_ratio}")


@register_policy(
    "duo",
    kind="heads",
    params=DuoParams,
    summary="DuoAttention: retrieval heads keep all tokens, streaming heads sinks + recent (retrieval score).",
)
class Duo(KVPolicy):
    def __init__(self, budget, params=None, *, n_layers=1):
        super().__init__(budget, params, n_layers=n_layers)
        p = self.params
        self.ratio = p.kv_retrieval_ratio if p.kv_retrieval_ratio is not None else (
            self.budget if self.budget_given else DEFAULT_RATIO)
        self.scores: dict[int, list[float]] | None = None
        self.retrieval: set[tuple[int, int]] | None = None  # (layer, KV head) pairs kept whole
        if self.ratio < 1:
            if p.kv_calibration is None:
                raise ValueError(f"DuoAttention at a retrieval-head ratio of {self.ratio} needs head scores: {HOW}")
            doc = load_calibration("duo", p.kv_calibration, HOW)
            self.scores = int_keys(doc.get("scores", doc))
            self.retrieval = top_heads(self.scores, round(self.ratio * head_count(self.scores)))

    def layer(self, layer_idx, rank=0):
        p = self.params
        if self.retrieval is None:
            return HeadSplitKV(layer_idx, None, p.kv_sink, lambda n: p.kv_recent)
        if layer_idx not in self.scores:
            raise ValueError(f"the DuoAttention calibration has no scores for layer {layer_idx}; {HOW}")
        heads = {h for (layer, h) in self.retrieval if layer == layer_idx}
        return HeadSplitKV(layer_idx, heads, p.kv_sink, lambda n: p.kv_recent, len(self.scores[layer_idx]))

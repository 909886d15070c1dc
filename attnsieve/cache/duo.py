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

import sys
from dataclasses import dataclass, field

import torch

from attnsieve.cache._heads import (
    HeadProbe,
    HeadSplitKV,
    calibration_path,
    head_count,
    int_keys,
    load_calibration,
    model_key,
    save_calibration,
    top_heads,
)
from attnsieve.cache.base import KVPolicy, KVPolicyParams, register_policy

HOW = ("calibrate once with attnsieve.cache.duo.calibrate_duo(model, tok) (cached per model), then pass "
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


def find_span(seq: list[int], sub: list[int]) -> tuple[int, int]:
    """[lo, hi) of the first occurrence of `sub` in `seq`."""
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i, i + len(sub)
    raise ValueError("the needle's tokens do not occur in the prompt")


def copy_hits(
    top: torch.Tensor, generated: list[int], ids: list[int], span: tuple[int, int]
) -> tuple[torch.Tensor, int]:
    """Retrieval-score counts of one generation (Wu et al.).

    top [steps, H]: each query head's most attended position at each generation step; generated:
    the token produced at each step; ids: prompt + generated tokens; span: the needle's [lo, hi).
    Returns (hits [H], copying steps): a copying step produces a token that occurs in the needle,
    a hit is a head whose top position lies in the needle and holds that same token.
    """
    lo, hi = span
    needle = set(ids[lo:hi])
    seq = torch.tensor(ids)
    hits = torch.zeros(top.shape[1])
    copies = 0
    for s, w in enumerate(generated):
        if w not in needle:
            continue
        copies += 1
        j = top[s].long()
        inside = (j >= lo) & (j < hi)
        hits += (inside & (seq[j.clamp(0, len(ids) - 1)] == w)).float()
    return hits, copies


def calibrate_duo(model, tok, *, length: int = 2048, samples: int = 5, name: str | None = None, cache_dir=None,
                  refresh: bool = False, progress: bool = True) -> dict[int, list[float]]:
    """Retrieval score of every KV head of the model's global layers: {layer: [score per KV head]}.

    Runs `samples` greedy generations on pass-key prompts of `length` tokens (needles at evenly
    spread depths) with exact attention, scoring heads as described in the module docstring.
    Cached as JSON under the attnsieve cache directory, keyed by model (`name`, else the model's
    path) and length; `refresh` recomputes. Patches the model only for the duration of the call.
    """
    from attnsieve.eval.tasks import make_passkey
    from attnsieve.eval.tasks.base import encode
    from attnsieve.integrations.hf import patched

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    key = model_key(name or str(getattr(model, "name_or_path", "") or type(model).__name__), cache_dir)
    path = calibration_path("duo", key, length, cache_dir)
    if path.exists() and not refresh:
        return int_keys(load_calibration("duo", str(path), HOW)["scores"])
    tops: dict[int, list[torch.Tensor]] = {}
    kv_heads: dict[int, int] = {}

    def record(phase, q, k, ctx):  # the last query's most attended position, per query head
        Hkv, G, D = k.shape[1], q.shape[1] // k.shape[1], q.shape[-1]
        kv_heads[ctx.layer_idx] = Hkv
        s = torch.einsum("hgd,htd->hgt", q[0, :, -1].float().view(Hkv, G, D), k[0].float())
        tops.setdefault(ctx.layer_idx, []).append(s.argmax(-1).reshape(-1))

    hits: dict[int, torch.Tensor] = {}
    copies = 0
    for i in range(samples):
        sample = make_passkey(tok, length, (i + 0.5) / samples, seed=i)
        ids = sample.input_ids
        if progress:
            print(f"attnsieve: DuoAttention calibration, pass-key prompt {i + 1}/{samples} ({length} tokens)",
                  file=sys.stderr)
        tops.clear()
        with patched(model, HeadProbe(record)), torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sample.max_new_tokens,
                                 do_sample=False)
        generated = out[0, ids.shape[1] :].tolist()
        full = out[0].tolist()
        span = find_span(full, encode(tok, sample.meta["needles"][0]))
        for layer, steps in tops.items():
            h, c = copy_hits(torch.stack(steps[: len(generated)]), generated, full, span)
            hits[layer] = hits.get(layer, 0) + h
        copies += c
    if copies == 0:
        raise ValueError(
            f"the model copied no needle token in {samples} pass-key prompts of {length} tokens, so no head can "
            "be scored; calibrate at a length the model handles (shorter) or with more samples"
        )
    per_query = {layer: (h / copies).tolist() for layer, h in sorted(hits.items())}
    per_kv = {}
    for layer, scores in per_query.items():  # a KV head serves its whole group: its best query head's score
        G = len(scores) // kv_heads[layer]
        per_kv[layer] = [max(scores[h * G : (h + 1) * G]) for h in range(kv_heads[layer])]
    save_calibration(path, {"policy": "duo", "model": key, "length": length, "samples": samples,
                            "copy_steps": copies, "query_head_scores": per_query, "scores": per_kv})
    return per_kv


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

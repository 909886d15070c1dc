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

HOW = ("calibrate once with attnsieve.cache.razor.calibrate_razor(model, tok) (cached per model), then pass "
       "kv_calibration=<model name or path, the JSON file, or the returned dict>")
QUERY_CHUNK = 256  # calibration queries scored at a time (bounds the [heads, chunk, T] buffer)


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


def repeated_random_tokens(vocab: int, period: int, repeats: int, seed: int, avoid: set[int]) -> list[int]:
    """`period` distinct random token ids (from the upper 90% of the vocabulary, specials avoided), repeated."""
    lo = vocab // 10
    pool = torch.tensor([t for t in range(lo, vocab) if t not in avoid])
    if period > pool.numel():
        raise ValueError(f"period {period} exceeds the {pool.numel()} usable token ids of this vocabulary")
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(pool.numel(), generator=g)[:period]].tolist() * repeats


def echo_induction_mass(q, k, scale: float, start: int, period: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Attention mass of the repeated copies' queries on echo and induction positions, summed over queries.

    q [1, H, T, D], k [1, Hkv, T, D]; the random tokens start at `start` (after a BOS, say) with
    period `period`. Query i of a later copy has echo positions i - m*period and induction positions
    i - m*period + 1 (m >= 1). Returns echo [H], induction [H], queries counted. Chunked over queries.
    """
    H, T, D = q.shape[1], q.shape[2], q.shape[3]
    Hkv = k.shape[1]
    G = H // Hkv
    echo = torch.zeros(H)
    induction = torch.zeros(H)
    kf = k[0].float()
    keys = torch.arange(T)
    first = start + period  # the first query whose token occurred before
    for s in range(first, T, QUERY_CHUNK):
        e = min(s + QUERY_CHUNK, T)
        qs = q[0, :, s:e].float().view(Hkv, G, e - s, D)
        scores = torch.einsum("hgcd,htd->hgct", qs, kf) * scale  # [Hkv, G, c, T]
        d = torch.arange(s, e)[:, None] - keys[None, :]  # [c, T] query - key distance
        scores = scores.masked_fill(d < 0, float("-inf"))
        p = torch.softmax(scores, dim=-1).reshape(H, e - s, T)
        later = d > 0
        echo += (p * (later & (d % period == 0) & (keys[None, :] >= start))).sum(dim=(1, 2))
        after = later & (d % period == period - 1) & (keys[None, :] > start)  # follows an occurrence
        induction += (p * after).sum(dim=(1, 2))
    return echo, induction, max(0, T - first)


def calibrate_razor(model, tok, *, period: int = 512, repeats: int = 4, seed: int = 0, name: str | None = None,
                    cache_dir=None, refresh: bool = False, progress: bool = True) -> dict[str, dict[int, list[float]]]:
    """Echo and induction scores of every KV head of the model's global layers.

    Returns {"echo": {layer: [score per KV head]}, "induction": {...}}; cached as JSON under the
    attnsieve cache directory keyed by model (`name`, else the model's path) and period * repeats.
    Patches the model only for the duration of the call.
    """
    from attnsieve.integrations.hf import patched

    if period < 2 or repeats < 2:
        raise ValueError(f"period must be >= 2 and repeats >= 2, got period={period}, repeats={repeats}")
    key = model_key(name or str(getattr(model, "name_or_path", "") or type(model).__name__), cache_dir)
    path = calibration_path("razor", key, period * repeats, cache_dir)
    if path.exists() and not refresh:
        doc = load_calibration("razor", str(path), HOW)
        return {"echo": int_keys(doc["echo"]), "induction": int_keys(doc["induction"])}
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    specials = {t for t in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if t is not None}
    ids = repeated_random_tokens(cfg.vocab_size, period, repeats, seed, specials)
    start = 0
    if tok.bos_token_id is not None:
        ids, start = [tok.bos_token_id, *ids], 1
    echo, induction = {}, {}

    def record(phase, q, k, ctx):
        e, i, n = echo_induction_mass(q, k, ctx.scale, start, period)
        G = q.shape[1] // k.shape[1]
        echo[ctx.layer_idx] = [float(e[h * G : (h + 1) * G].max()) / n for h in range(k.shape[1])]
        induction[ctx.layer_idx] = [float(i[h * G : (h + 1) * G].max()) / n for h in range(k.shape[1])]

    if progress:
        print(f"attnsieve: RazorAttention calibration, {period} random tokens x {repeats}", file=sys.stderr)
    with patched(model, HeadProbe(record)), torch.no_grad():
        model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
    save_calibration(path, {"policy": "razor", "model": key, "length": period * repeats, "period": period,
                            "repeats": repeats, "seed": seed, "echo": echo, "induction": induction})
    return {"echo": echo, "induction": induction}


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

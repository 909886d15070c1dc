"""Head calibrations that run the model: DuoAttention's retrieval heads and RazorAttention's echo/induction heads.

Both write their scores as JSON under the attnsieve cache directory (keyed by model and length), where
the `duo` and `razor` KV policies read them (`kv_calibration=<model name>`); the policies themselves
never run the model. DuoAttention's scores are the head profiles' retrieval scores
(`attnsieve.signals.heads.head_profiles`, Wu et al.'s definition), a KV head taking its best query
head's score. RazorAttention's are the attention mass on echo and induction positions of a repeated
random-token sequence (Tang et al., arXiv:2407.15891).
"""

from __future__ import annotations

import sys

import torch

from attnsieve.cache._heads import calibration_path, int_keys, load_calibration, model_key, save_calibration
from attnsieve.signals.heads import HeadProbe, head_profiles, kv_head_scores

DUO_HOW = ("calibrate once with attnsieve.signals.calibrate_duo(model, tok) (cached per model), then pass "
           "kv_calibration=<model name or path, the JSON file, or the returned dict>")
RAZOR_HOW = DUO_HOW.replace("calibrate_duo", "calibrate_razor")
QUERY_CHUNK = 256  # calibration queries scored at a time (bounds the [heads, chunk, T] buffer)


def _key(model, name, cache_dir) -> str:
    return model_key(name or str(getattr(model, "name_or_path", "") or type(model).__name__), cache_dir)


def calibrate_duo(model, tok, *, length: int = 2048, samples: int = 5, haystack: str = "repeat",
                  name: str | None = None, cache_dir=None, refresh: bool = False,
                  progress: bool = True) -> dict[int, list[float]]:
    """Retrieval score of every KV head of the model's global layers: {layer: [score per KV head]}.

    The head profiles' retrieval scores on `samples` pass-key prompts of `length` tokens (needles at
    evenly spread depths, on the `haystack` filler: "repeat", DuoAttention's synthetic setting, or
    "prose"); a KV head takes its best query head's score. Cached as JSON under the attnsieve cache
    directory, keyed by model (`name`, else the model's path) and length; `refresh` recomputes.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    key = _key(model, name, cache_dir)
    path = calibration_path("duo", key, length, cache_dir)
    if path.exists() and not refresh:
        return int_keys(load_calibration("duo", str(path), DUO_HOW)["scores"])
    prof = head_profiles(model, tok, lengths=[length], samples=samples, task="passkey", haystack=haystack,
                         name=name, cache_dir=cache_dir, refresh=refresh, progress=progress)
    if prof["copy_steps"] == 0:
        raise ValueError(
            f"the model copied no needle token in {samples} pass-key prompts of {length} tokens, so no head can "
            "be scored; calibrate at a length the model handles (shorter) or with more samples"
        )
    per_kv = kv_head_scores(prof, "retrieval", global_only=True)
    per_query = {row["layer"]: row["retrieval"] for row in prof["layers"] if not row["sliding"]}
    save_calibration(path, {"policy": "duo", "model": key, "length": length, "samples": samples,
                            "haystack": haystack, "copy_steps": prof["copy_steps"],
                            "query_head_scores": per_query, "scores": per_kv})
    return per_kv


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
    key = _key(model, name, cache_dir)
    path = calibration_path("razor", key, period * repeats, cache_dir)
    if path.exists() and not refresh:
        doc = load_calibration("razor", str(path), RAZOR_HOW)
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



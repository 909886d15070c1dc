"""Head profiles: what each attention head of a model does, read from its own attention.

For every (layer, query head) of a model, on needle prompts (`niah_single` on prose by default: a
sentence holding a 7-digit number the model is asked for; Wu et al. use needle-in-a-haystack too) it
answers with exact attention:

- **retrieval score** (Wu et al., "Retrieval Head Mechanistically Explains Long-Context
  Factuality", arXiv:2404.15574): while the model generates, a head copies a token when the
  generated token occurs in the needle and the head's most attended position holds that very token
  inside the needle; its score on a prompt is the number of distinct needle positions it copied
  divided by the needle's length, averaged over the prompts;
- **sink mass**: the attention its queries put on the first `sink_tokens` tokens;
- **local mass**: the attention on keys less than `local_window` positions back (the query included);
- **entropy**: of its attention rows, in nats;
- whether the layer is a sliding-window layer (Gemma-3's local layers) and its window.

The three mass statistics are means over the prompt's queries that can see past both windows
(query positions >= max(sink_tokens, local_window)), over all prompts. Attention is read one layer
and one chunk of `query_chunk` queries at a time: no T x T matrix for the whole model is formed.
Sliding layers are read inside their own window, as the model computes them.

`head_profiles` caches its result as JSON under the attnsieve cache directory, keyed by model and
settings; DuoAttention's calibration (`attnsieve.signals.calibrate_duo`) takes its retrieval
scores from here.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch

from attnsieve.methods import Method, exact_attention

METRICS = ("retrieval", "sink_mass", "local_mass", "entropy")


@dataclass
class _NoParams:
    pass


class HeadProbe(Method):
    """Exact attention that hands every call's (phase, q, k, ctx) to a callback (never registered).

    Patched into the global layers and, through `layers=`, into the sliding ones (a sliding layer's
    ctx.window is set), so a calibration sees every layer as the model computes it."""

    name = "head-probe"
    family = "dense"
    phases = ("prefill", "decode")
    supports_causal_mask = True
    Params = _NoParams
    summary = "exact attention observed by a calibration callback"

    def __init__(self, callback, sliding: bool = False):
        super().__init__()
        self.callback = callback
        self.sliding = sliding  # False: only global layers (ctx.window None) are reported

    def _report(self, phase, q, k, ctx):
        if self.sliding or ctx.window is None:
            self.callback(phase, q, k, ctx)

    def prefill(self, q, k, v, ctx):
        self._report("prefill", q, k, ctx)
        return exact_attention(q, k, v, ctx)

    def decode(self, q, k, v, ctx):
        self._report("decode", q, k, ctx)
        return exact_attention(q, k, v, ctx)


def find_span(seq: list[int], sub: list[int]) -> tuple[int, int]:
    """[lo, hi) of the first occurrence of `sub` in `seq`."""
    for i in range(len(seq) - len(sub) + 1):
        if seq[i : i + len(sub)] == sub:
            return i, i + len(sub)
    raise ValueError("the needle's tokens do not occur in the prompt")


def copied_positions(top: torch.Tensor, generated: list[int], ids: list[int], span: tuple[int, int]) -> list[set]:
    """Per query head, the needle positions it copied during one generation (Wu et al.'s g_h).

    top [steps, H]: each head's most attended absolute position at each generation step (step s
    produced generated[s]); ids: prompt + generated tokens; span: the needle's [lo, hi)."""
    lo, hi = span
    needle = set(ids[lo:hi])
    copied: list[set] = [set() for _ in range(top.shape[1])]
    for s, w in enumerate(generated[: top.shape[0]]):
        if w not in needle:
            continue
        for h, j in enumerate(top[s].tolist()):
            if lo <= j < hi and ids[j] == w:
                copied[h].add(j)
    return copied


def mass_stats(q: torch.Tensor, k: torch.Tensor, scale: float, window: int | None, sink_tokens: int,
               local_window: int, query_chunk: int = 256) -> tuple[torch.Tensor, ...]:
    """Sums over the eligible queries of one prefill call (batch row 0) of sink mass, local mass and entropy
    per query head [H], and the number of eligible queries (positions >= max(sink_tokens, local_window)).

    q [1, H, T, D], k [1, Hkv, T, D]; causal, inside `window` when the layer slides."""
    _, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    kf = k[0].float()
    first = max(sink_tokens, local_window)
    sink, local, ent = torch.zeros(H), torch.zeros(H), torch.zeros(H)
    keys = torch.arange(T)
    for s in range(first, T, query_chunk):
        e = min(s + query_chunk, T)
        qs = q[0, :, s:e].float().view(Hkv, G, e - s, D)
        logits = torch.einsum("hgcd,htd->hgct", qs, kf) * scale  # [Hkv, G, c, T]
        back = torch.arange(s, e)[:, None] - keys[None, :]  # [c, T] how far back each key is
        allowed = back >= 0
        if window is not None:
            allowed &= back < window
        p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).reshape(H, e - s, T)
        sink += p[..., :sink_tokens].sum(dim=(1, 2))
        local += (p * ((back >= 0) & (back < local_window))).sum(dim=(1, 2))
        ent += -(p * p.clamp_min(1e-30).log()).sum(dim=(1, 2))
    return sink, local, ent, max(0, T - first)


def _model_layout(model) -> tuple[int, list[int | None], int]:
    """(layers, per-layer sliding window or None, query heads)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
    windows = [getattr(cfg, "sliding_window", None) if t == "sliding_attention" else None for t in types]
    return n, windows, cfg.num_attention_heads


def check_settings(lengths, samples, sink_tokens, local_window, query_chunk) -> list[int]:
    if isinstance(lengths, int):
        lengths = [lengths]
    lengths = list(lengths)
    if not lengths or any((not isinstance(n, int)) or n < 64 for n in lengths):
        raise ValueError(f"lengths must be prompt lengths in tokens, each >= 64, got {lengths}")
    for name, val, lo in (("samples", samples, 1), ("sink_tokens", sink_tokens, 1), ("local_window", local_window, 1),
                          ("query_chunk", query_chunk, 1)):
        if not isinstance(val, int) or val < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}")
    if max(sink_tokens, local_window) >= min(lengths):
        raise ValueError(f"sink_tokens and local_window must be below the shortest length ({min(lengths)}), "
                         f"got {sink_tokens} and {local_window}")
    return lengths


@torch.no_grad()
def head_profiles(model, tok, *, lengths=(4096,), samples: int = 5, task: str = "niah_single", haystack: str = "prose",
                  sink_tokens: int = 4, local_window: int = 128, query_chunk: int = 256, seed: int = 0,
                  name: str | None = None, cache_dir=None, refresh: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Profile every (layer, query head) of `model` on `samples` needle prompts per length.

    Returns a JSON-ready dict: `layers` (per layer: `layer`, `sliding`, `window`, `kv_heads` and one
    list per metric of METRICS, indexed by query head), `prompts` (task, length, depth, seed and
    needle of each prompt), the settings, `model` (name or path), `fingerprint` (the architecture's
    config fingerprint), `copy_steps` (generation steps that produced a needle token, summed) and
    `versions`. Cached under the attnsieve cache directory by model, fingerprint and settings;
    `refresh` recomputes. The model is patched with exact attention only for the duration of the call.
    """
    from attnsieve.cache._heads import calibration_path, model_key, save_calibration
    from attnsieve.eval.tasks import TASKS
    from attnsieve.eval.tasks.base import encode
    from attnsieve.integrations.hf import patched
    from attnsieve.runinfo import run_info
    from attnsieve.tune.plan import fingerprint

    lengths = check_settings(lengths, samples, sink_tokens, local_window, query_chunk)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    key = model_key(name or str(getattr(model, "name_or_path", "") or type(model).__name__), cache_dir)
    fp = fingerprint(model)
    settings = {"lengths": lengths, "samples": samples, "task": task, "haystack": haystack,
                "sink_tokens": sink_tokens, "local_window": local_window, "seed": seed}
    tag = f"{fp[:8]}-{task}-{haystack}-{samples}x{'_'.join(map(str, lengths))}-s{sink_tokens}-w{local_window}-r{seed}"
    path = calibration_path(f"heads-{tag}", key, max(lengths), cache_dir)
    if path.exists() and not refresh:
        import json

        doc = json.loads(path.read_text())
        if doc.get("fingerprint") == fp and doc.get("settings") == settings:
            return doc
    n_layers, windows, H = _model_layout(model)
    totals = {m: [torch.zeros(H) for _ in range(n_layers)] for m in METRICS}
    eligible = [0] * n_layers
    kv_heads = [0] * n_layers
    prompts = []
    copy_steps = 0
    n_prompts = len(lengths) * samples
    done = 0
    for length in lengths:
        for i in range(samples):
            depth = (i + 0.5) / samples
            sample = TASKS[task](tok, length, depth, seed + i, haystack=haystack)
            needles = sample.meta.get("needles")
            if not needles:
                raise ValueError(f"task {task!r} has no needle to copy; use passkey or a niah task")
            ids = torch.as_tensor(sample.input_ids).view(1, -1)
            T = ids.shape[1]
            done += 1
            if progress:
                print(f"attnsieve heads: prompt {done}/{n_prompts} ({task}, {T} tokens, depth {depth:.2f})",
                      file=sys.stderr)
            calls = [0] * n_layers
            tops: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

            def record(phase, q, k, ctx, T=T, calls=calls, tops=tops):
                li = ctx.layer_idx
                Hkv, G, D = k.shape[1], q.shape[1] // k.shape[1], q.shape[-1]
                kv_heads[li] = Hkv
                if phase == "prefill" and q.shape[2] > 1:
                    s, loc, e, n = mass_stats(q, k, ctx.scale, ctx.window, sink_tokens, local_window, query_chunk)
                    totals["sink_mass"][li] += s
                    totals["local_mass"][li] += loc
                    totals["entropy"][li] += e
                    eligible[li] += n
                # the last query's most attended key, as an absolute position
                Tk = k.shape[2]
                t_abs = T + calls[li]  # keys the query sees in all (this call's last query included)
                calls[li] += 1
                logits = torch.einsum("hgd,htd->hgt", q[0, :, -1].float().view(Hkv, G, D), k[0].float())
                back = (Tk - 1) - torch.arange(Tk)
                if ctx.window is not None:
                    logits = logits.masked_fill(back >= ctx.window, float("-inf"))
                tops[li].append(logits.argmax(-1).reshape(-1) + (t_abs - Tk))

            probe = HeadProbe(record, sliding=True)
            sliding_layers = {li: HeadProbe(record, sliding=True) for li, w in enumerate(windows) if w is not None}
            with patched(model, probe, layers=sliding_layers or None):
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sample.max_new_tokens,
                                     do_sample=False)
            generated = out[0, T:].tolist()
            full = out[0].tolist()
            span = find_span(full, encode(tok, needles[0]))
            needle_tokens = set(full[span[0] : span[1]])
            copy_steps += sum(1 for w in generated if w in needle_tokens)
            for li in range(n_layers):
                if not tops[li]:
                    continue
                copied = copied_positions(torch.stack(tops[li][: len(generated)]), generated, full, span)
                totals["retrieval"][li] += torch.tensor([len(c) / (span[1] - span[0]) for c in copied])
            prompts.append({"task": task, "length": T, "depth": depth, "seed": seed + i, "needle": needles[0]})
    layers = []
    for li in range(n_layers):
        row = {"layer": li, "sliding": windows[li] is not None, "window": windows[li], "kv_heads": kv_heads[li]}
        row["retrieval"] = (totals["retrieval"][li] / n_prompts).tolist()
        for m in ("sink_mass", "local_mass", "entropy"):
            row[m] = (totals[m][li] / max(1, eligible[li])).tolist()
        layers.append(row)
    doc = {"kind": "heads", "model": key, "fingerprint": fp, "settings": settings, "prompts": prompts,
           "copy_steps": copy_steps, "layers": layers, "versions": run_info(seed)}
    save_calibration(path, doc)
    return doc


def metric_grid(profiles: dict, metric: str) -> torch.Tensor:
    """[layers, query heads] of one metric of a `head_profiles` result."""
    if metric not in METRICS:
        raise ValueError(f"unknown head metric {metric!r}; choose from {', '.join(METRICS)}")
    return torch.tensor([row[metric] for row in profiles["layers"]])


def retrieval_query_heads(profiles: dict, fraction: float = 0.1, *, global_only: bool = False) -> set[tuple[int, int]]:
    """The top `fraction` of all (layer, query head) pairs by retrieval score, among the heads that copied
    at least once (a head scoring 0 is no retrieval head; ties: lower layer, lower head); `global_only` ranks
    the non-sliding layers only. Raises ValueError when no head copied anything."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    rows = [row for row in profiles["layers"] if not (global_only and row["sliding"])]
    pairs = [(-s, row["layer"], h) for row in rows for h, s in enumerate(row["retrieval"]) if s > 0]
    if not pairs:
        raise ValueError("no head copied a needle token in these profiles; profile more or shorter prompts")
    count = max(1, math.ceil(fraction * sum(len(row["retrieval"]) for row in rows)))
    return {(layer, h) for _, layer, h in sorted(pairs)[:count]}


def kv_head_scores(profiles: dict, metric: str = "retrieval", *, global_only: bool = True) -> dict[int, list[float]]:
    """{layer: [score per KV head]}: a KV head takes its best query head's score (its cache serves the group)."""
    out = {}
    for row in profiles["layers"]:
        if global_only and row["sliding"]:
            continue
        scores, Hkv = row[metric], row["kv_heads"]
        G = len(scores) // Hkv
        out[row["layer"]] = [max(scores[h * G : (h + 1) * G]) for h in range(Hkv)]
    return out


def save_heatmaps(profiles: dict, folder) -> list:
    """One PNG per metric (layer x query head), sliding layers marked; returns the paths."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    labels = [f"{row['layer']}{' (s)' if row['sliding'] else ''}" for row in profiles["layers"]]
    for m in METRICS:
        grid = metric_grid(profiles, m).numpy()
        fig, ax = plt.subplots(figsize=(2 + 0.5 * grid.shape[1], 1 + 0.3 * grid.shape[0]))
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("query head")
        ax.set_ylabel("layer ((s): sliding window)")
        ax.set_title(f"{m} ({profiles['model']})", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        p = folder / f"heads_{m}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths

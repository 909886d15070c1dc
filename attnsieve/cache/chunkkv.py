"""ChunkKV: keep whole chunks of consecutive prompt tokens, chosen by their mean token score.

After prefill, each batch row's stored prompt is cut into chunks of `kv_chunk` consecutive tokens
(the last one may be shorter). An inner scorer gives every token of every KV head a score; a
chunk's score is the mean over its tokens of the scores summed over the layer's KV heads, and the
best chunks are kept whole, the same chunks for every KV head of the layer, so phrases survive
intact instead of as scattered tokens. Decoded tokens are appended. Liu et al., "ChunkKV:
Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM Inference", arXiv:2502.00299
(2025).

Reference followed: NVIDIA kvpress, `kvpress/presses/chunkkv_press.py`, `ChunkKVPress.compress`,
as its evaluation registry runs it: `ChunkKVPress(press=SnapKVPress(), chunk_length=20)`. Defaults
from there: `kv_chunk` 20; the inner scorer `kv_scorer="snapkv"` is `SnapKVPress.score` with its
defaults, `kv_window` 64 (mean attention of the last 64 prompt queries and the group's query heads)
and `kv_kernel` 5 (average pooling over the tokens before the window); the window's own tokens score
one above the highest other score of their batch row (kvpress: of the whole batch).
`kv_scorer="keydiff"` scores with KeyDiff's key dissimilarity instead (no attention). A prompt
shorter than one chunk is scored token by token, per KV head, as the reference then falls back to
its inner press.

Deviations: the reference keeps max(1, floor(chunks x (1 - ratio))) chunks; here, so that the
cache never holds more than the budget, the forced tokens (`kv_sink` first tokens, 4: Gemma-3 needs
its first key, ChunkKV forces none; `kv_recent` latest, 0) are kept, then each chunk in score order
is kept whole if it still fits in the row's budget ceil(kv_budget x real prompt tokens) (a chunk
holding forced tokens costs only its others), so a budget under one chunk keeps only the forced
tokens. The reference applies batch row 0's chunks to every row; each row chooses its own here.
Chunks count the row's stored tokens, so left padding never shifts them; prefilling in chunks
re-chunks the kept tokens plus the new ones at each compression. The paper's layer-wise index
reuse is not implemented (kvpress has none either).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attnsieve.cache.base import EvictingKV, KVPolicy, KVPolicyParams, forced_mask, register_policy
from attnsieve.cache.keydiff import keydiff_scores

SCORERS = ("snapkv", "keydiff")


@dataclass
class ChunkKVParams(KVPolicyParams):
    kv_chunk: int = field(default=20, metadata={"help": "tokens per chunk (>= 1; kvpress chunk_length 20)"})
    kv_scorer: str = field(default="snapkv", metadata={"help": "inner token scorer: snapkv or keydiff"})
    kv_window: int = field(default=64, metadata={"help": "snapkv scorer: observation window, last queries (>= 1)"})
    kv_kernel: int = field(default=5, metadata={"help": "snapkv scorer: average-pooling kernel (odd, >= 1)"})

    def __post_init__(self):
        super().__post_init__()
        if self.kv_chunk < 1:
            raise ValueError(f"kv_chunk must be >= 1, got {self.kv_chunk}")
        if self.kv_scorer not in SCORERS:
            raise ValueError(f"kv_scorer must be one of {', '.join(SCORERS)}, got {self.kv_scorer!r}")
        if self.kv_window < 1:
            raise ValueError(f"kv_window must be >= 1, got {self.kv_window}")
        if self.kv_kernel < 1 or self.kv_kernel % 2 == 0:
            raise ValueError(f"kv_kernel must be an odd number >= 1, got {self.kv_kernel}")


def snapkv_press_scores(layer: EvictingKV, q, new_valid, scale, window: int, kernel: int) -> list[torch.Tensor]:
    """[L] per row as kvpress's SnapKVPress.score: window attention averaged, pooled, the window on top."""
    probs = layer.observation_probs(q, new_valid, scale, window)  # [N, G, w, Lmax]
    s = probs.mean(dim=(1, 2))  # [N, Lmax]: over the window's queries and the group's query heads
    prefixes = []
    for r, p in enumerate(layer.pos):
        n_before = int((p.long() < layer.seen - window).sum())  # the window's tokens are the row's last
        pre = s[r, :n_before]
        if kernel > 1 and n_before > 0:  # pooled over the tokens before the window only, zero-padded
            pre = F.avg_pool1d(pre[None, None], kernel_size=kernel, stride=1, padding=kernel // 2)[0, 0]
        prefixes.append(pre)
    scores = []
    for b in range(layer.B):  # the window scores above every other token of its batch row
        rows = range(b * layer.Hkv, (b + 1) * layer.Hkv)
        before = torch.cat([prefixes[r] for r in rows])
        top = (before.max() if before.numel() else before.new_zeros(())) + 1
        for r in rows:
            n_win = layer.pos[r].numel() - prefixes[r].numel()
            scores.append(torch.cat([prefixes[r], top.expand(n_win)]))
    return scores


def chunk_means(total: torch.Tensor, chunk: int) -> torch.Tensor:
    """[ceil(L / chunk)]: the mean of `total` [L] over each chunk (the last one may be shorter)."""
    n = total.numel()
    sums = torch.zeros((n + chunk - 1) // chunk, dtype=total.dtype, device=total.device)
    idx = torch.arange(n, device=total.device) // chunk
    sums.index_add_(0, idx, total)
    return sums / torch.bincount(idx, minlength=sums.numel()).to(total.dtype)


class ChunkKVLayer(EvictingKV):
    def should_compress(self, Tq):
        return Tq > 1  # compress the prompt once (and each prefill chunk); decoded tokens are kept

    def token_scores(self, q, k_new, new_valid, scale):
        if self.p.kv_scorer == "keydiff":
            return keydiff_scores(self)
        return snapkv_press_scores(self, q, new_valid, scale, self.p.kv_window, self.p.kv_kernel)

    def compress(self, q, k_new, new_valid, scale) -> None:
        got = self.scored_budgets(q, k_new, new_valid, scale)
        if got is None:
            return
        budgets, scores = got
        C, Hkv = self.p.kv_chunk, self.Hkv
        keep = []
        for b in range(self.B):
            rows = range(b * Hkv, (b + 1) * Hkv)
            pos = self.pos[b * Hkv]  # every head of a row stores the same tokens (same chunks for all)
            L, n = pos.numel(), budgets[b * Hkv]
            forced = forced_mask(pos, self.seen, self.p.kv_sink, self.p.kv_recent)
            if L < C:  # no whole chunk: token by token, per head, as the reference's fallback
                for r in rows:
                    s = torch.where(forced, torch.inf, scores[r].float())
                    keep.append(torch.topk(s, min(n, L)).indices)
                continue
            total = torch.stack([scores[r].float() for r in rows]).sum(0)  # [L] summed over KV heads
            kept = forced.clone()
            for c in chunk_means(total, C).argsort(descending=True, stable=True).tolist():
                span = slice(c * C, min((c + 1) * C, L))
                if int(kept.sum()) + int((~kept[span]).sum()) <= n:  # whole, or not at all
                    kept[span] = True
            idx = torch.nonzero(kept).squeeze(-1)[:n]  # more forced tokens than the budget: the first
            keep.extend(idx for _ in rows)
        self.keep_rows(keep)


@register_policy(
    "chunkkv",
    kind="eviction",
    params=ChunkKVParams,
    summary="ChunkKV: whole chunks of 20 prompt tokens with the best mean SnapKV score, same for all KV heads.",
)
class ChunkKV(KVPolicy):
    def layer(self, layer_idx, rank=0):
        return ChunkKVLayer(layer_idx, self)

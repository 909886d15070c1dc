"""Quest: nothing is evicted; each decoding step reads only the pages its query can score highest.

The cache is cut into pages of `kv_page` tokens, each summarised by its per-channel minimum and
maximum keys. At every decoding step each query head bounds its score against every page
(sum over channels of max(q_c * min_c, q_c * max_c)), keeps its top pages within the token budget
(the last, partial page always included) and attends exactly over their tokens. Tang et al.,
"Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML 2024 (arXiv:2406.10774).

Parameters: `kv_page` (tokens per page, paper 16). `kv_budget` is the fraction of the cached
tokens each decoding step reads (Quest evicts nothing; its metadata adds 2 / page of the key
bytes). Prefill (and prefill chunks) attend the whole past exactly, as Quest does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnsieve.cache.base import KVPolicy, LayerKV, PastAttention, register_policy
from attnsieve.kernels import softmax_with_lse


@dataclass
class QuestParams:
    kv_page: int = field(default=16, metadata={"help": "tokens per page (>= 1)"})

    def __post_init__(self):
        if self.kv_page < 1:
            raise ValueError(f"kv_page must be >= 1, got {self.kv_page}")


class QuestLayer(LayerKV):
    def __init__(self, layer_idx: int, budget: float, page: int):
        super().__init__(layer_idx)
        self.budget, self.page = budget, page
        self.kmin: list[torch.Tensor] = []  # per row, [pages, D] over the complete pages
        self.kmax: list[torch.Tensor] = []

    def _held(self):
        return [*super()._held(), *self.kmin, *self.kmax]

    def compress(self, q, k_new, new_valid, scale) -> None:
        # Nothing is evicted: summarise every newly completed page.
        if not self.kmin:
            D = self.keys[0].shape[-1]
            self.kmin = [self.keys[0].new_zeros(0, D) for _ in self.keys]
            self.kmax = [self.keys[0].new_zeros(0, D) for _ in self.keys]
        P = self.page
        for r, k in enumerate(self.keys):
            done, full = self.kmin[r].shape[0], k.shape[0] // P
            if full > done:
                pages = k[done * P : full * P].view(full - done, P, -1)
                self.kmin[r] = torch.cat([self.kmin[r], pages.amin(1)])
                self.kmax[r] = torch.cat([self.kmax[r], pages.amax(1)])

    def attend_past(self, q, scale, new_valid):
        B, H, Tq, D = q.shape
        if Tq > 1 or self.budget >= 1.0:
            return super().attend_past(q, scale, new_valid)
        G = H // self.Hkv
        P = self.page
        out = q.new_zeros(B, H, 1, self.values[0].shape[-1])
        lse = q.new_full((B, H, 1), float("-inf"))
        cells = 0
        for r in range(len(self.keys)):
            b, h = divmod(r, self.Hkv)
            k, v = self.keys[r], self.values[r]
            L = k.shape[0]
            if L == 0 or (new_valid is not None and not bool(new_valid[b, 0])):
                continue
            qh = q[b, h * G : (h + 1) * G, 0].float()  # [G, D]
            n_pages = self.kmin[r].shape[0]
            tail = torch.arange(n_pages * P, L, device=q.device)  # the partial page: always read
            budget_pages = max(0, math.ceil(self.budget * L / P) - (1 if tail.numel() else 0))
            k_sel = min(budget_pages, n_pages)
            if k_sel > 0:
                bound = qh.clamp_min(0) @ self.kmax[r].float().T + qh.clamp_max(0) @ self.kmin[r].float().T
                pages = bound.topk(k_sel, dim=-1).indices  # [G, k_sel] per query head
                tok = (pages[..., None] * P + torch.arange(P, device=q.device)).reshape(G, -1)
                tok = torch.cat([tok, tail.expand(G, -1)], dim=1)
            else:
                tok = tail.expand(G, -1)
            kg, vg = k[tok].float(), v[tok].float()  # [G, n, D]
            s = torch.einsum("gd,gnd->gn", qh, kg) * scale
            o, l = softmax_with_lse(s[:, None, :], vg)  # [G, 1, Dv], [G, 1]
            out[b, h * G : (h + 1) * G] = o.to(out.dtype)
            lse[b, h * G : (h + 1) * G] = l.to(lse.dtype)
            cells += tok.numel()
        return PastAttention(out, lse, cells)


@register_policy(
    "quest",
    kind="selection",
    params=QuestParams,
    summary="Quest: page min/max summaries, each decoding step reads its query's top pages; nothing evicted.",
)
class Quest(KVPolicy):
    def layer(self, layer_idx, rank=0):
        return QuestLayer(layer_idx, self.budget, self.params.kv_page)

"""Recycled Attention: full attention every few steps; in between, only the tokens it ranked highest.

Every `kv_stride` decoding steps the query attends the whole cache and each KV head records its
top tokens by attention (summed over the group's query heads); the following steps attend only
those tokens plus every token generated since. Nothing is evicted. Xu et al., "Recycled
Attention: Efficient inference for long-context language models", arXiv:2411.05787.

Parameters: `kv_stride` (steps between full-attention steps, paper 10). `kv_budget` is the
fraction of the cached tokens the recycled steps read (the paper's top-k over the context).
Prefill attends the whole past exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnsieve.cache.base import KVPolicy, LayerKV, PastAttention, register_policy
from attnsieve.kernels import softmax_with_lse


@dataclass
class RecycledParams:
    kv_stride: int = field(default=10, metadata={"help": "decoding steps between full-attention steps (>= 1)"})

    def __post_init__(self):
        if self.kv_stride < 1:
            raise ValueError(f"kv_stride must be >= 1, got {self.kv_stride}")


class RecycledLayer(LayerKV):
    def __init__(self, layer_idx: int, budget: float, stride: int):
        super().__init__(layer_idx)
        self.budget, self.stride = budget, stride
        self.step = 0
        self.recycled: list[torch.Tensor] = []  # per row, stored-token indices chosen at the last full step
        self.horizon: list[int] = []  # per row, stored tokens existing at the last full step

    def _held(self):
        return [*super()._held(), *self.recycled]

    def attend_past(self, q, scale, new_valid):
        B, H, Tq, D = q.shape
        if Tq > 1 or self.budget >= 1.0:
            return super().attend_past(q, scale, new_valid)
        G = H // self.Hkv
        full = self.step % self.stride == 0
        self.step += 1
        out = q.new_zeros(B, H, 1, self.values[0].shape[-1])
        lse = q.new_full((B, H, 1), float("-inf"))
        cells = 0
        if full:
            self.recycled, self.horizon = [], []
        for r in range(len(self.keys)):
            b, h = divmod(r, self.Hkv)
            k, v = self.keys[r], self.values[r]
            qh = q[b, h * G : (h + 1) * G, 0].float()
            if full:
                idx = torch.arange(k.shape[0], device=q.device)
            else:
                since = torch.arange(self.horizon[r], k.shape[0], device=q.device)
                idx = torch.cat([self.recycled[r], since])
            if idx.numel() == 0 or (new_valid is not None and not bool(new_valid[b, 0])):
                if full:
                    self.recycled.append(idx[:0])
                    self.horizon.append(k.shape[0])
                continue
            s = (qh @ k[idx].float().T) * scale  # [G, n]
            o, l = softmax_with_lse(s[:, None, :], v[idx].float())
            out[b, h * G : (h + 1) * G] = o.to(out.dtype)
            lse[b, h * G : (h + 1) * G] = l.to(lse.dtype)
            cells += G * idx.numel()
            if full:
                keep = min(k.shape[0], max(1, math.ceil(self.budget * k.shape[0])))
                mass = torch.softmax(s, dim=-1).sum(0)
                self.recycled.append(mass.topk(keep).indices.sort().values)
                self.horizon.append(k.shape[0])
        return PastAttention(out, lse, cells)


@register_policy(
    "recycled",
    kind="selection",
    params=RecycledParams,
    summary="Recycled Attention: full attention every S steps, its top-k tokens reused in between.",
)
class Recycled(KVPolicy):
    def layer(self, layer_idx, rank=0):
        return RecycledLayer(layer_idx, self.budget, self.params.kv_stride)

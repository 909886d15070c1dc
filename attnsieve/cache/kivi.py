"""KIVI: keys quantised per channel, values per token, to 2, 4 or 8 bits, with a full-precision tail.

Keys have outlier channels, so each channel is quantised over groups of `kv_group` tokens; values
have no such channels and are quantised per token over groups of `kv_group` channels. The most
recent `kv_residual` tokens stay in full precision (a key group is quantised once it is complete),
so the stored cache really holds packed integer codes plus fp16 scales and minima. Liu et al.,
"KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024 (arXiv:2402.02750).

Parameters: `kv_bits` (2, 4 or 8; None: the largest whose bytes fit `kv_budget`, 2 without a
budget), `kv_group` (group size, paper 32), `kv_residual` (full-precision recent tokens, paper 128).
Attention dequantises the stored codes into a temporary buffer at each call (freed afterwards);
`reconstruction_error()` reports the relative error of what was quantised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.cache._quant import BITS, Quantized, quantize
from attnsieve.cache.base import KVPolicy, LayerKV, register_policy


@dataclass
class KIVIParams:
    kv_bits: int | None = field(default=None, metadata={"help": "2, 4 or 8 bits (None: from kv_budget, else 2)"})
    kv_group: int = field(default=32, metadata={"help": "tokens per key group / channels per value group (>= 1)"})
    kv_residual: int = field(default=128, metadata={"help": "recent tokens kept in full precision (>= 0)"})

    def __post_init__(self):
        if self.kv_bits is not None and self.kv_bits not in BITS:
            raise ValueError(f"kv_bits must be one of {BITS}, got {self.kv_bits}")
        if self.kv_group < 1:
            raise ValueError(f"kv_group must be >= 1, got {self.kv_group}")
        if self.kv_residual < 0:
            raise ValueError(f"kv_residual must be >= 0, got {self.kv_residual}")


def bits_for_budget(budget: float, dtype_bytes: int = 4) -> int:
    """Largest bit width whose codes (ignoring scales) fit in `budget` of the dense bytes."""
    fitting = [b for b in BITS if b / (8 * dtype_bytes) <= budget]
    return max(fitting) if fitting else min(BITS)


class KIVILayer(LayerKV):
    def __init__(self, layer_idx: int, bits: int, group: int, residual: int):
        super().__init__(layer_idx)
        self.bits, self.group, self.residual = bits, group, residual
        self.qk: list[list[Quantized]] = []  # per row, quantised key groups (oldest first)
        self.qv: list[list[Quantized]] = []
        self.qpos: list[list[torch.Tensor]] = []
        self.err_num = 0.0
        self.err_den = 0.0

    def _held(self):
        return [*super()._held(), *(t for row in self.qpos for t in row)]

    def nbytes(self) -> int:
        return super().nbytes() + sum(q.nbytes() for rows in (self.qk, self.qv) for row in rows for q in row)

    def compress(self, q, k_new, new_valid, scale) -> None:
        if not self.qk:
            self.qk = [[] for _ in self.keys]
            self.qv = [[] for _ in self.keys]
            self.qpos = [[] for _ in self.keys]
        g = self.group
        for r in range(len(self.keys)):
            n = (self.keys[r].shape[0] - self.residual) // g * g  # whole key groups beyond the residual
            if n <= 0:
                continue
            k, v = self.keys[r][:n], self.values[r][:n]
            D, Dv = k.shape[-1], v.shape[-1]
            qk = quantize(k.view(n // g, g, D), self.bits, axis=1)  # per channel over g tokens
            gv = g if Dv % g == 0 else Dv
            qv = quantize(v.view(n, Dv // gv, gv), self.bits, axis=2)  # per token over gv channels
            self.err_num += float((qk.dequantize().view(n, D) - k).float().pow(2).sum())
            self.err_num += float((qv.dequantize().view(n, Dv) - v).float().pow(2).sum())
            self.err_den += float(k.float().pow(2).sum() + v.float().pow(2).sum())
            self.qk[r].append(qk)
            self.qv[r].append(qv)
            self.qpos[r].append(self.pos[r][:n])
            self.keys[r], self.values[r], self.pos[r] = self.keys[r][n:], self.values[r][n:], self.pos[r][n:]

    def row_tensors(self):
        if not any(self.qk):
            return super().row_tensors()
        saved = self.keys, self.values, self.pos
        D, Dv = self.keys[0].shape[-1], self.values[0].shape[-1]
        self.keys = [torch.cat([*(x.dequantize().view(-1, D) for x in qk), k]) for qk, k in zip(self.qk, saved[0],
                                                                                              strict=True)]
        self.values = [torch.cat([*(x.dequantize().view(-1, Dv) for x in qv), v]) for qv, v in zip(self.qv, saved[1],
                                                                                                 strict=True)]
        self.pos = [torch.cat([*qp, p]) for qp, p in zip(self.qpos, saved[2], strict=True)]
        try:
            return super().row_tensors()  # a temporary dequantised batch; the stored codes are unchanged
        finally:
            self.keys, self.values, self.pos = saved

    def stored_tokens(self):
        n = [sum(p.numel() for p in qp) + p.numel() for qp, p in zip(self.qpos or [[]] * len(self.pos), self.pos,
                                                                        strict=True)]
        return torch.tensor(n).view(self.B, self.Hkv)

    def reconstruction_error(self) -> float:
        """Relative RMS error of every key and value quantised so far (0 before any)."""
        return (self.err_num / self.err_den) ** 0.5 if self.err_den else 0.0


@register_policy(
    "kivi",
    kind="quantisation",
    params=KIVIParams,
    summary="KIVI: per-channel key / per-token value quantisation (2/4/8-bit), full-precision recent tail.",
)
class KIVI(KVPolicy):
    def layer(self, layer_idx, rank=0):
        p = self.params
        bits = p.kv_bits if p.kv_bits is not None else bits_for_budget(self.budget) if self.budget_given else 2
        return KIVILayer(layer_idx, bits, p.kv_group, p.kv_residual)

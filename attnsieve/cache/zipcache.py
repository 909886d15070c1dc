"""ZipCache: mixed-precision KV quantisation, salient tokens (by normalised attention) at high precision.

A token's saliency is its accumulated attention divided by the number of queries that could see it
(the normalised attention score: plain accumulation favours early tokens, which more queries see).
At prefill it is estimated from probe queries (the last 5% and a random 5% of the call's queries);
the top `kv_salient_ratio` of each KV head's tokens are quantised at `kv_bits_high` bits and the
others at `kv_bits_low`. As the reference code configures it, keys are quantised per channel (over
the tokens of each precision group) and values with the paper's channel-separable token-wise
quantisation (each channel divided by sqrt(max |v_c|), then per-token min/max), so the cache holds
packed codes plus fp16 parameters.
Decoded tokens stay in full precision until `kv_residual` of them have accumulated; then they are
quantised as one group, their saliency being the normalised attention the decoding queries gave
them. He et al., "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token
Identification", NeurIPS 2024 (arXiv:2405.14256).

Parameters: `kv_bits_high` / `kv_bits_low` (4 / 2, the reference code's), `kv_salient_ratio` (0.6, the
reference code's 40% unimportant tokens), `kv_residual` (decoded tokens kept in full precision
before quantising them, the reference code's streaming gap 100), `kv_probe_ratio` (0.1: half recent, half
random), `kv_bits` (sets both widths, e.g. 8). With `kv_budget` (a fraction of the dense bytes) and
no `kv_bits`, the salient ratio is set so the average code width fills the budget (scales ignored).
Deviations: the normaliser counts the probe queries that see a token (the formula applied to the
probe rows; the reference code divides by all queries); during decoding every query's attention is
accumulated (the reference scores the new tokens with the one query at which it compresses); the
channel scale of values is computed per precision group. `reconstruction_error()` reports the
relative RMS error of everything quantised so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnsieve.cache._quant import BITS, Quantized, quantize
from attnsieve.cache.base import KVPolicy, LayerKV, register_policy


@dataclass
class ZipCacheParams:
    kv_bits_high: int = field(default=4, metadata={"help": "bits of salient tokens: 2, 4 or 8"})
    kv_bits_low: int = field(default=2, metadata={"help": "bits of the other tokens: 2, 4 or 8 (<= high)"})
    kv_salient_ratio: float = field(default=0.6, metadata={"help": "fraction of tokens kept at high bits, [0, 1]"})
    kv_residual: int = field(default=100, metadata={"help": "decoded tokens kept full precision before quantising"})
    kv_probe_ratio: float = field(default=0.1, metadata={"help": "fraction of prefill queries used as probes, (0, 1]"})
    kv_bits: int | None = field(default=None, metadata={"help": "2, 4 or 8: sets both widths (None: keep them)"})

    def __post_init__(self):
        if self.kv_bits is not None:
            if self.kv_bits not in BITS:
                raise ValueError(f"kv_bits must be one of {BITS}, got {self.kv_bits}")
            self.kv_bits_high = self.kv_bits_low = self.kv_bits
        for name in ("kv_bits_high", "kv_bits_low"):
            if getattr(self, name) not in BITS:
                raise ValueError(f"{name} must be one of {BITS}, got {getattr(self, name)}")
        if self.kv_bits_low > self.kv_bits_high:
            raise ValueError(f"kv_bits_low ({self.kv_bits_low}) must be <= kv_bits_high ({self.kv_bits_high})")
        if not 0 <= self.kv_salient_ratio <= 1:
            raise ValueError(f"kv_salient_ratio must be in [0, 1], got {self.kv_salient_ratio}")
        if self.kv_residual < 1:
            raise ValueError(f"kv_residual must be >= 1, got {self.kv_residual}")
        if not 0 < self.kv_probe_ratio <= 1:
            raise ValueError(f"kv_probe_ratio must be in (0, 1], got {self.kv_probe_ratio}")


@dataclass
class Part:
    """Tokens of one row quantised at one width: keys per channel, values channel-separable per token."""

    keys: Quantized  # [n, D] codes, scale/zero [1, D]
    values: Quantized  # [n, Dv] codes of v / channel, scale/zero [n, 1]
    channel: torch.Tensor  # [Dv] fp16 value channel scales sqrt(max |v_c|)
    pos: torch.Tensor  # [n] int32

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes() + sum(t.numel() * t.element_size() for t in
                                                               (self.channel, self.pos))

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys.dequantize(), (self.values.dequantize().float() * self.channel.float()).to(self.values.dtype)


def quantize_part(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, bits: int) -> Part:
    """Channel-wise keys, channel-separable token-wise values (ZipCache's scheme) at `bits`."""
    channel = v.float().abs().amax(0).sqrt().clamp_min(1e-4).half()  # [Dv]
    values = quantize((v.float() / channel.float()).to(v.dtype), bits, axis=1)
    return Part(quantize(k, bits, axis=0), values, channel, pos)


def salient_count(n: int, ratio: float) -> int:
    return min(n, max(0, round(ratio * n)))


def probe_queries(Tq: int, real: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    """Probe query indices of a call of Tq queries (real [Tq] bool): the last half of a `ratio` share of the
    queries plus as many random earlier real ones (generator seeded with `seed`), real queries only."""
    m = max(1, math.ceil(ratio * Tq))
    recent = max(1, m // 2)
    idx = torch.arange(Tq, device=real.device)
    earlier = idx[: Tq - recent][real[: Tq - recent]]
    g = torch.Generator().manual_seed(seed)
    pick = earlier[torch.randperm(earlier.numel(), generator=g)[: m - recent].to(earlier.device)]
    chosen = torch.cat([pick.sort().values, idx[Tq - recent :]])
    return chosen[real[chosen]]


def normalised_scores(probs: torch.Tensor, seen_by: torch.Tensor) -> torch.Tensor:
    """Accumulated attention [L] over the number of queries that could see each token [L] (0 if none)."""
    return torch.where(seen_by > 0, probs / seen_by.clamp_min(1), torch.zeros_like(probs))


class ZipCacheLayer(LayerKV):
    def __init__(self, layer_idx: int, high: int, low: int, ratio: float, residual: int, probe_ratio: float,
                 budget: float | None = None):
        super().__init__(layer_idx)
        self.high, self.low, self.ratio = high, low, ratio
        self.budget = budget  # a byte budget overrides the salient ratio (set from the cache's dtype)
        self.residual, self.probe_ratio = residual, probe_ratio
        self.parts: list[list[Part]] = []  # per row, quantised groups
        self.scratch: dict[int, tuple | None] = {}  # per row, this call's dequantised parts (transient)
        self.acc: list[torch.Tensor] = []  # per row, attention the decoding queries gave each tail token
        self.seen_by: list[torch.Tensor] = []  # per row, how many decoding queries saw each tail token
        self.err_num = 0.0
        self.err_den = 0.0

    def _init(self, k, v):
        super()._init(k, v)
        if self.budget is not None:
            self.ratio = salient_ratio_for_budget(self.budget, self.high, self.low, k.element_size())
        n = self.B * self.Hkv
        self.parts = [[] for _ in range(n)]
        self.acc = [torch.zeros(0, device=k.device) for _ in range(n)]
        self.seen_by = [torch.zeros(0, device=k.device) for _ in range(n)]

    def _held(self):
        return [*super()._held(), *self.acc, *self.seen_by]

    def nbytes(self):
        return super().nbytes() + sum(p.nbytes() for row in self.parts for p in row)

    def stored_tokens(self):
        n = [sum(p.pos.numel() for p in row) + t.numel() for row, t in zip(self.parts, self.pos, strict=True)]
        return torch.tensor(n).view(self.B, self.Hkv)

    def row_keys(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row r's keys, values and positions as attention sees them: dequantised parts, then the tail.

        The dequantised parts are kept only until this call's `compress` ends (attention and the
        saliency update share them), never between calls.
        """
        if r not in self.scratch:
            deq = [p.dequantize() for p in self.parts[r]]
            self.scratch[r] = (torch.cat([d[0] for d in deq]), torch.cat([d[1] for d in deq]),
                               torch.cat([p.pos for p in self.parts[r]])) if deq else None
        parts = self.scratch[r]
        if parts is None:
            return self.keys[r], self.values[r], self.pos[r]
        return (torch.cat([parts[0], self.keys[r]]), torch.cat([parts[1], self.values[r]]),
                torch.cat([parts[2], self.pos[r]]))

    def row_tensors(self):
        if not any(self.parts):
            return super().row_tensors()
        saved = self.keys, self.values, self.pos
        rows = [self.row_keys(r) for r in range(len(saved[0]))]
        self.keys, self.values, self.pos = (list(x) for x in zip(*rows, strict=True))
        try:
            return super().row_tensors()  # a temporary dequantised batch; the stored codes are unchanged
        finally:
            self.keys, self.values, self.pos = saved

    def tail_probs(self, q: torch.Tensor, qi: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of the queries qi of row r (indices into this call) on its tail tokens, summed over the
        KV group's heads and those queries [tail], and how many of those queries see each tail token."""
        B, H, Tq, D = q.shape
        G = H // self.Hkv
        b, h = divmod(r, self.Hkv)
        k, _, pos = self.row_keys(r)
        q_pos = self.seen - Tq + qi  # [m] absolute positions
        s = q[b, h * G : (h + 1) * G, qi].float() @ k.float().T * scale  # [G, m, L]
        sees = pos[None, :].long() <= q_pos[:, None]  # [m, L] causal
        p = torch.softmax(s.masked_fill(~sees, float("-inf")), dim=-1).nan_to_num(0.0)
        n = self.pos[r].numel()
        return p.sum(dim=(0, 1))[-n:] if n else p.new_zeros(0), sees.sum(0)[-n:].float() if n else p.new_zeros(0)

    def probe_queries(self, Tq: int, real: torch.Tensor) -> torch.Tensor:
        return probe_queries(Tq, real, self.probe_ratio, 1000003 * self.layer_idx + self.seen)

    def compress(self, q, k_new, new_valid, scale):
        try:
            self.update(q, k_new, new_valid, scale)
        finally:
            self.scratch.clear()  # no dequantised copy outlives the call

    def update(self, q, k_new, new_valid, scale):
        Tq = k_new.shape[2]
        for r in range(len(self.keys)):
            b = r // self.Hkv
            n = self.pos[r].numel()
            if n == 0:
                continue
            real = torch.ones(Tq, dtype=torch.bool, device=q.device) if new_valid is None else new_valid[b].bool()
            if Tq > 1:  # prefill: probe queries score every tail token, then the whole tail is quantised
                probes = self.probe_queries(Tq, real)
                acc, seen_by = self.tail_probs(q, probes, r, scale)
                self.quantize_tail(r, normalised_scores(acc, seen_by))
                continue
            if new_valid is None or bool(real[0]):  # decoding: accumulate this query's attention on the tail
                acc, seen_by = self.tail_probs(q, torch.zeros(1, dtype=torch.long, device=q.device), r, scale)
                pad = n - self.acc[r].numel()
                self.acc[r] = torch.cat([self.acc[r], self.acc[r].new_zeros(pad)]) + acc
                self.seen_by[r] = torch.cat([self.seen_by[r], self.seen_by[r].new_zeros(pad)]) + seen_by
            if n >= self.residual:
                self.quantize_tail(r, normalised_scores(self.acc[r], self.seen_by[r]))

    def quantize_tail(self, r: int, scores: torch.Tensor) -> None:
        """Quantise row r's whole tail: its top-scoring tokens at high bits, the others at low bits."""
        k, v, pos = self.keys[r], self.values[r], self.pos[r]
        n = pos.numel()
        salient = torch.zeros(n, dtype=torch.bool, device=k.device)
        salient[torch.topk(scores, salient_count(n, self.ratio)).indices] = True
        for mask, bits in ((salient, self.high), (~salient, self.low)):
            if not bool(mask.any()):
                continue
            km, vm = k[mask], v[mask]
            part = quantize_part(km, vm, pos[mask], bits)
            kd, vd = part.dequantize()
            self.err_num += float((kd.float() - km.float()).pow(2).sum() + (vd.float() - vm.float()).pow(2).sum())
            self.err_den += float(km.float().pow(2).sum() + vm.float().pow(2).sum())
            self.parts[r].append(part)
        self.scratch.pop(r, None)
        self.keys[r], self.values[r], self.pos[r] = k[:0], v[:0], pos[:0]
        self.acc[r], self.seen_by[r] = self.acc[r][:0], self.seen_by[r][:0]

    def reconstruction_error(self) -> float:
        """Relative RMS error of every key and value quantised so far (0 before any)."""
        return (self.err_num / self.err_den) ** 0.5 if self.err_den else 0.0


def salient_ratio_for_budget(budget: float, high: int, low: int, dtype_bytes: int = 4) -> float:
    """Share of high-bit tokens whose average code width fills `budget` of the dense bytes (scales ignored)."""
    if high == low:
        return 1.0
    avg = budget * 8 * dtype_bytes
    return min(1.0, max(0.0, (avg - low) / (high - low)))


@register_policy(
    "zipcache",
    kind="quantisation",
    params=ZipCacheParams,
    summary="ZipCache: salient tokens (normalised attention, probe queries) at high bits, the rest at low bits.",
)
class ZipCache(KVPolicy):
    def layer(self, layer_idx, rank=0):
        p = self.params
        budget = self.budget if self.budget_given and p.kv_bits is None else None
        return ZipCacheLayer(layer_idx, p.kv_bits_high, p.kv_bits_low, p.kv_salient_ratio, p.kv_residual,
                             p.kv_probe_ratio, budget)

"""Past keys stored in a reduced space of r < D numbers per token: shared by ThinK and lowrank-kv.

Each row (batch row b, KV head h) holds segments of past tokens whose keys are stored reduced,
plus a full-precision tail (the base LayerKV lists) of tokens not reduced yet. A segment maps its
reduced keys back to the key space either by kept channel indices (ThinK: the reconstruction is
the key with the other channels zeroed) or by a basis P [D, r] with orthonormal columns and an
offset mu [D] (lowrank-kv: the reconstruction is mu + P k_r). A query scores a reduced key as
q[channels] . k_r, or (q P) . k_r + q . mu, which is exactly q . (reconstruction): attention runs
in the reduced space and never rebuilds D-wide keys. Values are stored whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsieve.cache.base import LayerKV, PastAttention
from attnsieve.kernels import softmax_with_lse


@dataclass
class Segment:
    keys: torch.Tensor  # [n, r] reduced keys
    values: torch.Tensor  # [n, Dv]
    pos: torch.Tensor  # [n] int32 true positions
    channels: torch.Tensor | None = None  # [r] int64 kept channel indices (ThinK)
    basis: torch.Tensor | None = None  # [D, r] orthonormal columns (lowrank-kv)
    offset: torch.Tensor | None = None  # [D] added back to every key (lowrank-kv: the keys' mean)

    def tensors(self) -> list[torch.Tensor]:
        extra = (self.channels, self.basis, self.offset)
        return [self.keys, self.values, self.pos, *(t for t in extra if t is not None)]

    def scores(self, q: torch.Tensor) -> torch.Tensor:
        """q [R, D] (accumulation dtype) -> unscaled scores [R, n] against the reconstructed keys."""
        k = self.keys.to(q.dtype)
        if self.channels is not None:
            return q[:, self.channels] @ k.T
        s = (q @ self.basis.to(q.dtype)) @ k.T
        return s + (q @ self.offset.to(q.dtype))[:, None]

    def reconstruct(self, D: int) -> torch.Tensor:
        """The D-wide keys this segment stands for (for tests and error reports), [n, D]."""
        if self.channels is not None:
            full = self.keys.new_zeros(self.keys.shape[0], D)
            full[:, self.channels] = self.keys
            return full
        return self.offset + self.keys @ self.basis.T


class ReducedKeyKV(LayerKV):
    """A global layer whose rows hold reduced-key segments plus a full-precision tail."""

    def __init__(self, layer_idx: int):
        super().__init__(layer_idx)
        self.segments: list[list[Segment]] = []  # per row, oldest first

    def _init(self, k, v):
        super()._init(k, v)
        self.segments = [[] for _ in range(self.B * self.Hkv)]

    def _held(self):
        return [*super()._held(), *(t for row in self.segments for s in row for t in s.tensors())]

    def stored_tokens(self):
        n = [sum(s.pos.numel() for s in row) + p.numel() for row, p in zip(self.segments, self.pos, strict=True)]
        return torch.tensor(n).view(self.B, self.Hkv)

    def reduce_tail(self, r: int, n: int, **mapping) -> None:
        """Move the first n tail tokens of row r into reduced storage.

        With a mapping (`channels=`, or `basis=` and `offset=`) they start a new segment; without one
        they are appended to the row's last segment, reduced by its mapping.
        """
        k = self.keys[r][:n]
        last = self.segments[r][-1] if not mapping else None
        m = mapping or {"channels": last.channels, "basis": last.basis, "offset": last.offset}
        if m.get("channels") is not None:
            reduced = k[:, m["channels"]]
        else:
            reduced = ((k - m["offset"]) @ m["basis"]).to(k.dtype)
        v, p = self.values[r][:n], self.pos[r][:n]
        if last is None:
            self.segments[r].append(Segment(reduced.contiguous(), v, p, **mapping))
        else:
            last.keys = torch.cat([last.keys, reduced])
            last.values = torch.cat([last.values, v])
            last.pos = torch.cat([last.pos, p])
        self.keys[r], self.values[r], self.pos[r] = self.keys[r][n:], self.values[r][n:], self.pos[r][n:]

    def reconstructed_keys(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row r's keys as attention sees them (segments reconstructed, then the tail), with positions."""
        D = self.keys[r].shape[-1]
        keys = torch.cat([*(s.reconstruct(D) for s in self.segments[r]), self.keys[r]])
        pos = torch.cat([*(s.pos for s in self.segments[r]), self.pos[r]])
        return keys, pos

    def attend_past(self, q, scale, new_valid):
        """Exact attention of q [B, H, Tq, D] over every row's segments (reduced space) and tail."""
        B, H, Tq, D = q.shape
        G = H // self.Hkv
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        Dv = self.values[0].shape[-1]
        out = q.new_zeros(B, H, Tq, Dv)
        lse = torch.full((B, H, Tq), float("-inf"), dtype=acc, device=q.device)
        cells = 0
        for r in range(len(self.keys)):
            b, h = divmod(r, self.Hkv)
            segs = self.segments[r]
            if not segs and self.keys[r].shape[0] == 0:
                continue
            qi = q[b, h * G : (h + 1) * G].reshape(G * Tq, D).to(acc)  # the KV head's G query heads x Tq
            scores = torch.cat([*(s.scores(qi) for s in segs), qi @ self.keys[r].to(acc).T], dim=1) * scale
            values = torch.cat([*(s.values for s in segs), self.values[r]]).to(acc)  # [L, Dv]
            n_real = G * Tq  # query rows that attend (a host count where there is no padding)
            if new_valid is not None:  # padding queries see nothing of the past
                real = new_valid[b].bool().repeat(G)
                scores = scores.masked_fill(~real[:, None], float("-inf"))
                n_real = int(real.sum())
            o, l = softmax_with_lse(scores, values)
            out[b, h * G : (h + 1) * G] = o.view(G, Tq, Dv).to(out.dtype)
            lse[b, h * G : (h + 1) * G] = l.view(G, Tq)
            cells += n_real * scores.shape[1]
        return PastAttention(out, lse, cells)

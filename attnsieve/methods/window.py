"""StreamingLLM's pattern: a few attention-sink tokens plus a local window, as true local attention.

Each query attends the first `sink` real tokens of its sequence and the `window` most recent
tokens (itself included). The local part runs as banded block attention and the sink part as a
tiny gathered attention; the two are merged exactly through their log-sum-exp, so nothing is
computed outside the pattern. Xiao et al., "Efficient Streaming Language Models with Attention
Sinks", ICLR 2024 (arXiv:2309.17453). MInference calls the same pattern "A-shape".

Hyperparameters: `sink` (tokens kept at the start, paper default 4), `window` (recent tokens,
self included), `density` (when set, overrides `window`: the window is sized on each input so
the measured density lands at or just below it), `block_size` (kernel block for the band).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.kernels import dense_attention, local_attention, merge
from attnsieve.methods.base import AttnOutput, Method
from attnsieve.methods.registry import register, register_alias


@dataclass
class WindowParams:
    sink: int = field(default=4, metadata={"help": "attention-sink tokens kept at the start (>= 0)"})
    window: int = field(default=1024, metadata={"help": "recent tokens attended, the query included (>= 1)"})
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides window when set"}
    )
    block_size: int = field(default=64, metadata={"help": "kernel block size for the local band (16..512)"})

    def __post_init__(self):
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0 tokens, got {self.sink}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1 token, got {self.window}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")


def window_for_density(density: float, Tq: int, Tk: int, sink: int) -> int:
    """Largest window whose sink + local cells stay within `density` of the causal cells."""
    p = torch.arange(Tk - Tq, Tk, dtype=torch.float64)  # absolute query positions
    total = float((p + 1).sum())

    def cells(w: int) -> float:
        local = torch.clamp(p + 1, max=w)
        sinks = torch.clamp(torch.clamp(p + 1 - w, min=0), max=sink)
        return float((local + sinks).sum())

    lo, hi = 1, Tk
    while lo < hi:  # cells() is increasing in w
        mid = (lo + hi + 1) // 2
        if cells(mid) <= density * total:
            lo = mid
        else:
            hi = mid - 1
    return lo


def first_real_positions(key_valid: torch.Tensor | None, batch: int, Tk: int, n: int, device) -> torch.Tensor:
    """[B, n] positions of the first n real keys of each row (-1 where a row has fewer)."""
    if key_valid is None:
        pos = torch.arange(min(n, Tk), device=device).expand(batch, -1)
    else:
        rank = key_valid.long().cumsum(-1) - 1  # rank of each real key
        take = key_valid & (rank < n)
        pos = torch.full((batch, n), -1, dtype=torch.long, device=device)
        b, t = take.nonzero(as_tuple=True)
        pos[b, rank[b, t]] = t
    return torch.nn.functional.pad(pos, (0, n - pos.shape[1]), value=-1)


@register(
    "window",
    family="sparse",
    phases=("prefill",),
    params=WindowParams,
    summary="StreamingLLM: sink tokens + local window, computed as true local attention.",
)
class Window(Method):
    exact_params = {"window": 1 << 30}  # degenerate setting: equals dense attention

    def prefill(self, q, k, v, ctx):
        p = self.params
        B, H, Tq, _ = q.shape
        Tk = k.shape[2]
        w = window_for_density(p.density, Tq, Tk, p.sink) if p.density is not None else p.window
        if ctx.window is not None:  # on a sliding layer, never look beyond the layer's own window
            w = min(w, ctx.window)
        local = local_attention(q, k, v, window=w, scale=ctx.scale, key_valid=ctx.key_valid, block_size=p.block_size)
        if p.sink == 0 or w >= Tk:
            return AttnOutput(local.out, local.cells, lse=local.lse)

        # Sink part: the first `sink` real keys, only where they lie outside the local window.
        pos = first_real_positions(ctx.key_valid, B, Tk, p.sink, q.device)  # [B, S]
        gather = pos.clamp_min(0)[:, None, :, None]
        ks = torch.gather(k, 2, gather.expand(-1, k.shape[1], -1, k.shape[3]))
        vs = torch.gather(v, 2, gather.expand(-1, v.shape[1], -1, v.shape[3]))
        q_pos = torch.arange(Tk - Tq, Tk, device=q.device)[None, :, None]  # [1, Tq, 1]
        k_pos = pos[:, None, :]  # [B, 1, S]
        mask = (k_pos >= 0) & (k_pos <= q_pos) & (q_pos - k_pos >= w)  # [B, Tq, S]
        if ctx.window is not None:
            mask &= q_pos - k_pos < ctx.window
        if ctx.key_valid is not None:
            mask &= ctx.key_valid[:, Tk - Tq :, None]
        out_s, lse_s = dense_attention(q, ks, vs, causal=False, scale=ctx.scale, mask=mask[:, None])
        out, lse = merge(local.out, local.lse, out_s, lse_s)
        return AttnOutput(out, local.cells + H * int(mask.sum()), lse=lse)


# MInference's name for the same pattern, with its defaults (n_init=128 sink tokens, n_local=3968
# local tokens, so that sink + local = 4k); Jiang et al., "MInference 1.0", NeurIPS 2024
# (arXiv:2407.02490). An alias, not a second implementation.
register_alias("a-shape", "window", sink=128, window=3968)

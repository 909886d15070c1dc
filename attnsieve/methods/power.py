"""PowerAttention: a static block pattern whose key blocks lie at power-of-two distances.

Each query block attends the key blocks 1, 2, 4, 8, ... blocks back, plus a local window of
blocks and the first (sink) block, so any earlier token is reachable within log2(distance)
layers and the receptive field doubles with depth; the pattern depends only on positions, so
choosing it costs nothing and it is causal by construction. Chen et al., "PowerAttention:
Exponentially Scaling of Receptive Fields for Effective Sparse Attention", arXiv:2503.03588
(2025); the mask is the paper's Algorithm 1 on the block grid.

Hyperparameters (paper defaults, Section 4.1 / Algorithm 1):
- `block_size`: tokens per block (256, "to align with GPU compute cores").
- `local_blocks`: local window in blocks, the diagonal included (5): key block kb is kept when
  qb - kb < local_blocks.
- `sink_blocks`: first blocks always kept (1 block of initial tokens; with left padding, the
  first blocks holding a real key).
- power blocks: qb - kb a power of two (every power, up to the context), as `d & (d - 1) == 0`.
- `density`: when set, overrides the budget so the measured density lands near it. The paper
  sizes its budget as a fixed number of blocks per query at 32k (5 local + 1 sink + 4 power
  blocks, sparsity 0.94). Here the pattern keeps its shape and is scaled: the block size is
  halved from `block_size` (down to 16) until the paper-shaped pattern (`local_blocks` local +
  `sink_blocks` sink + powers) fits under the target, then local blocks are added to land
  closest to it (when even 16-token blocks do not fit, local blocks are removed, down to the
  diagonal). Cells per block pair are counted in
  closed form (`_static.pair_cells`), so the density the kernel measures is known exactly for
  unpadded inputs; left padding lowers the real cells and so the measured density somewhat.

Deviations: none in the pattern. The paper fine-tunes the model on its pattern (continued
pre-training + ChatQA 2); here it is applied training-free, as the paper's "untrained
PowerAttention" probe (Section 4.6) does, so long-range retrieval depends on what the pretrained
model propagates through the power blocks of its few global layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.kernels import BlockSupport, block_grid
from attnsieve.methods._static import closest, pair_cells
from attnsieve.methods.base import SparseMethod
from attnsieve.methods.registry import register
from attnsieve.methods.selection import block_layout


@dataclass
class PowerParams:
    block_size: int = field(default=256, metadata={"help": "tokens per block (16..512); paper 256"})
    local_blocks: int = field(default=5, metadata={"help": "local window in blocks, diagonal included (>= 1)"})
    sink_blocks: int = field(default=1, metadata={"help": "first (sink) blocks always kept (>= 0)"})
    density: float | None = field(
        default=None,
        metadata={"help": "target measured density in (0, 1]; scales the block grid and the local window"},
    )

    def __post_init__(self):
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.local_blocks < 1:
            raise ValueError(f"local_blocks must be >= 1 (the diagonal block), got {self.local_blocks}")
        if self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be >= 0, got {self.sink_blocks}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")


def power_blocks(first_qb: int, n_q: int, n_k: int, local_blocks: int, device=None) -> torch.Tensor:
    """[NQ, NK] bool: key blocks at distance 0, a power of two, or inside the local window."""
    d = torch.arange(first_qb, first_qb + n_q, device=device)[:, None] - torch.arange(n_k, device=device)[None, :]
    return (d >= 0) & ((d < local_blocks) | ((d & (d - 1)) == 0))


def local_density_curve(Tq: int, Tk: int, bs: int, window: int | None, sink_blocks: int) -> torch.Tensor:
    """float64 [NK]: density of the power pattern with local_blocks = 1 .. NK (unpadded input)."""
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    cells = pair_cells(Tq, Tk, bs, window)  # [NQ, NK]
    d = torch.arange(first, first + n_q)[:, None] - torch.arange(n_k)[None, :]
    is_sink = (torch.arange(n_k) < sink_blocks)[None, :].expand_as(d)
    power = (d >= 0) & ((d & (d - 1)) == 0)
    base = int(cells[is_sink | power].sum())
    # Cells of the non-sink, non-power pairs at each distance; local_blocks = w adds distances < w.
    rest = torch.where(is_sink | power | (d < 0), torch.zeros_like(cells), cells)
    by_dist = torch.zeros(n_k, dtype=torch.long).scatter_add_(0, d.clamp_min(0).reshape(-1), rest.reshape(-1))
    return (base + torch.cumsum(by_dist, 0)).double() / max(1, int(cells.sum()))


def calibrate(Tq: int, Tk: int, window: int | None, p: PowerParams) -> tuple[int, int]:
    """(block_size, local_blocks) whose measured density on an unpadded input is nearest p.density.

    The largest grid (block_size, halved down to 16) on which the paper-shaped pattern fits under
    the target is kept, and local blocks are then added up to the target; when no grid fits, the
    finest one is used with fewer local blocks.
    """
    bs = p.block_size
    while True:
        curve = local_density_curve(Tq, Tk, bs, window, p.sink_blocks)
        if float(curve[min(p.local_blocks, len(curve)) - 1]) <= p.density or bs // 2 < 16:
            return bs, closest(curve, p.density) + 1
        bs //= 2


@register(
    "power",
    family="sparse",
    phases=("prefill",),
    params=PowerParams,
    summary="PowerAttention: static key blocks at power-of-two distances + local window + sink block.",
)
class Power(SparseMethod):
    exact_params = {"density": 1.0}  # degenerate setting: equals dense attention

    def support(self, q, k, ctx):
        p = self.params
        B, Tq, Tk, Hkv = q.shape[0], q.shape[2], k.shape[2], k.shape[1]
        bs, local = (p.block_size, p.local_blocks) if p.density is None else calibrate(Tq, Tk, ctx.window, p)
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, q.device)
        pattern = power_blocks(layout.first_qb, layout.n_q, layout.n_k, local, q.device)  # [NQ, NK]
        kb = torch.arange(layout.n_k, device=q.device)[None, None, :]
        sink = (kb >= layout.sink[:, None, None]) & (kb < layout.sink[:, None, None] + p.sink_blocks)  # [B, 1, NK]
        keep = (pattern[None] | sink) & layout.allowed  # [B, NQ, NK]
        return BlockSupport.from_mask(keep[:, None].expand(B, Hkv, -1, -1), bs)

"""S2-Attention: heterogeneous strided context shards across heads, plus a dense local window.

Beyond its local window each query head attends one key block in every `stride`, at an offset
that differs per head, so the heads of a layer read different shards of the context and their
union covers it (fully when there are at least `stride` heads); the pattern depends only on
positions and head index, so it costs nothing to choose and is causal by construction. Lin et
al., "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads" (earlier title:
"Efficient LLM Training and Serving with Heterogeneous Context Sharding among Attention Heads"),
arXiv:2407.17678 (2024); the pattern follows the authors' DKernel `get_sparse_attn_mask`
(absolute, "vertical" positions) and the configuration Phi-3-small ships with.

Hyperparameters (defaults: DKernel / Phi-3-small `blocksparse_*` settings):
- `block_size`: tokens per block (64).
- `local_blocks`: dense local window in blocks, the diagonal included (16, i.e. 1024 tokens).
- `stride`: vertical stride (8): head h keeps key block kb when
  (kb + h * step + head_offset) % stride == 0, step = max(1, stride // num_heads), so the heads'
  offsets are spread evenly over one stride.
- `head_offset`: DKernel's `head_sliding_offset` (0: block 0 belongs to head 0's shard).
- `sink_blocks`: first blocks always kept, in every head (1; see deviations).
- `density`: when set, overrides `local_blocks` and `stride` so the measured density lands near
  it: half of the target goes to the local window (the largest window, at least the diagonal,
  whose sink + local density stays within half the target), and the stride is the one whose
  total density comes closest to the target (stride 1 keeps everything). Cells per block pair
  are counted in closed form (`_static.pair_cells`), so the density is exact on unpadded inputs.

Deviations:
- Shards are per query head, also with grouped-query attention: the heads of one KV group read
  different shards, so the group's union covers the context. DKernel's default for GQA gives
  all heads of a group one shard (so each KV head caches only its shard); on a model with one KV
  head (Gemma 3) that would leave most of the context unseen by every head. DKernel documents
  per-query-head shards over shared keys as the alternative; this is it.
- `sink_blocks=1` is added: S2 models are trained with the pattern, while a pretrained model's
  heads put much of their attention on the first tokens (StreamingLLM's sinks) and lose it in
  the heads whose shard misses block 0. Set `sink_blocks=0` for the pure pattern.
- The paper's hybrid architecture (some dense layers) is a per-layer choice: use `layers=` in
  `patch()`.
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
class StridedParams:
    block_size: int = field(default=64, metadata={"help": "tokens per block (16..512)"})
    local_blocks: int = field(default=16, metadata={"help": "dense local window in blocks, diagonal included (>= 1)"})
    stride: int = field(default=8, metadata={"help": "each head keeps one key block in every `stride` (>= 1)"})
    head_offset: int = field(default=0, metadata={"help": "DKernel head_sliding_offset: shard offset of head 0 (>= 0)"})
    sink_blocks: int = field(default=1, metadata={"help": "first (sink) blocks always kept in every head (>= 0)"})
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides local_blocks and stride"}
    )

    def __post_init__(self):
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.local_blocks < 1:
            raise ValueError(f"local_blocks must be >= 1 (the diagonal block), got {self.local_blocks}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.head_offset < 0:
            raise ValueError(f"head_offset must be >= 0, got {self.head_offset}")
        if self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be >= 0, got {self.sink_blocks}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")


def head_offsets(num_heads: int, stride: int, head_offset: int, device=None) -> torch.Tensor:
    """[H] shard offset of each query head (DKernel: h * max(1, stride // H) + head_offset)."""
    step = max(1, stride // num_heads)
    return torch.arange(num_heads, device=device) * step + head_offset


def strided_blocks(first_qb, n_q, n_k, num_heads, local_blocks, stride, head_offset, device=None) -> torch.Tensor:
    """[H, NQ, NK] bool: each head's local window and its strided shard, causal."""
    kb = torch.arange(n_k, device=device)
    d = torch.arange(first_qb, first_qb + n_q, device=device)[:, None] - kb[None, :]  # [NQ, NK]
    shard = (kb[None, :] + head_offsets(num_heads, stride, head_offset, device)[:, None]) % stride == 0  # [H, NK]
    return (d >= 0)[None] & ((d < local_blocks)[None] | shard[:, None, :])


def calibrate(Tq: int, Tk: int, num_heads: int, window: int | None, p: StridedParams) -> tuple[int, int]:
    """(local_blocks, stride) whose measured density on an unpadded input is nearest p.density."""
    bs = p.block_size
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    cells = pair_cells(Tq, Tk, bs, window)  # [NQ, NK]
    total = max(1, int(cells.sum()))
    kb = torch.arange(n_k)
    d = torch.arange(first, first + n_q)[:, None] - kb[None, :]
    is_sink = (kb < p.sink_blocks)[None, :].expand_as(d)
    sink = int(cells[is_sink].sum())
    rest = torch.where(is_sink | (d < 0), torch.zeros_like(cells), cells)
    by_dist = torch.zeros(n_k, dtype=torch.long).scatter_add_(0, d.clamp_min(0).reshape(-1), rest.reshape(-1))
    local_curve = (sink + torch.cumsum(by_dist, 0)).double() / total  # local_blocks = 1 .. NK
    local = max(1, int((local_curve <= p.density / 2).sum()))
    local_cells = float(local_curve[local - 1]) * total
    # Cells each key block adds to a head's shard when it lies beyond the local window.
    beyond = torch.where(d >= local, rest, torch.zeros_like(rest)).sum(0)  # [NK]
    dens = torch.empty(n_k, dtype=torch.float64)
    for s in range(1, n_k + 1):
        by_residue = torch.bincount(kb % s, weights=beyond.double(), minlength=s)
        residue = (-head_offsets(num_heads, s, p.head_offset)) % s
        dens[s - 1] = (num_heads * local_cells + float(by_residue[residue].sum())) / (num_heads * total)
    return local, closest(dens, p.density) + 1


@register(
    "strided",
    family="sparse",
    phases=("prefill",),
    params=StridedParams,
    summary="S2-Attention: per-head strided context shards (union covers the context) + local window + sink.",
)
class Strided(SparseMethod):
    exact_params = {"density": 1.0}  # degenerate setting: equals dense attention

    def support(self, q, k, ctx):
        p = self.params
        B, H, Tq = q.shape[:3]
        Tk = k.shape[2]
        local, stride = (p.local_blocks, p.stride) if p.density is None else calibrate(Tq, Tk, H, ctx.window, p)
        layout = block_layout(Tq, Tk, p.block_size, ctx.key_valid, ctx.window, B, q.device)
        pattern = strided_blocks(layout.first_qb, layout.n_q, layout.n_k, H, local, stride, p.head_offset, q.device)
        kb = torch.arange(layout.n_k, device=q.device)[None, None, None, :]
        start = layout.sink[:, None, None, None]
        sink = (kb >= start) & (kb < start + p.sink_blocks)  # [B, 1, 1, NK]
        keep = (pattern[None] | sink) & layout.allowed[:, None]  # [B, H, NQ, NK]: one list per query head
        return BlockSupport.from_mask(keep, p.block_size)

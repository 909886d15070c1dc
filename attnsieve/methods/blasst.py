"""BLASST: skip a key block inside the online softmax when its scores cannot matter.

Attention runs as a block-wise online softmax (FlashAttention order: each query block visits its
key blocks from the first, the sink, to the diagonal); a key block whose largest score lies more
than ln(1/lambda) below the running row maximum skips its exponentials and its value product.
Yuan, Shinn, Xu, et al., "BLASST: Dynamic BLocked Attention Sparsity via Softmax Thresholding",
2025 (arXiv:2512.12087). Kernel: attnsieve/kernels/skip_softmax.py.

What is measured: the rule needs every block's scores to see its maximum, so BLASST computes every
score of the exact layer. Its `cells` (and so its measured density) are those of dense attention;
the cells whose exponentials and value products were skipped are reported apart as
`AttnOutput.skipped_cells`. Here `density` means the fraction of scored cells that are NOT
skipped, the paper's "1 - sparsity".

Hyperparameters:
- `threshold_scale` (a): the paper's calibration law lambda = a / L, L = the sequence's context
  length (real keys of the batch row); the paper finds the best threshold falls inversely with
  length. Default 0.7, read off the paper's Llama-3.1-8B operating point (~75% sparsity at
  lambda ~1e-4 for 8K and ~1e-5 for 64K); the paper fits a per model.
- `threshold` (lambda): a fixed threshold in [0, 1] instead of a / L (0 never skips: dense).
- `density`: target fraction of non-skipped cells in (0, 1]; overrides both (see below).
- `block_size`: query and key tile (the reference simulation's Br = Bc = 128).
- `calib_chunks`: how many consecutive query chunks `density` calibrates over (below).

Deviations from the paper, and why:
- The skip decision is per query row, not per tile. The paper's kernel skips a tile when all of
  its rows agree (a warp vote), so a later query of the tile can change whether an earlier query
  sees the block: a causal leak. Per row, no output depends on a later token. A tile whose rows
  all skip still drops out of the step's exponentials and value product.
- The paper calibrates `a` offline (a threshold sweep over sampled sequences, then a fit of
  lambda against 1 / L). `density` instead calibrates on the input, causally: the queries are
  split into `calib_chunks` chunks (at least 4 blocks each); chunk c uses lambda_r = a_c / L_r,
  L_r = row r's own context length (the paper's inverse law applied per row, since a prefill
  row sees L_r keys), with a_c the quantile of the gaps the kernel itself observed on the rows of
  chunks before c, chosen so the non-skipped cells so far track the target. The first chunk has
  nothing before it and skips nothing. No extra scores are computed for calibration; its cost
  (a histogram quantile per chunk) is reported as estimate_s.
- Decoding stays exact (the paper also skips in decode kernels); this method covers prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnsieve.kernels.skip_softmax import context_lengths, skip_softmax_attention
from attnsieve.methods._causal_calibration import chunk_bounds, histogram_edges, keep_threshold
from attnsieve.methods.base import AttnOutput, Method, estimate_clock
from attnsieve.methods.registry import register

# Gap statistic (block max - running max + ln L_r) binned for calibration, natural-log units.
GAP_LO, GAP_HI, GAP_STEP = -40.0, 20.0, 0.02


@dataclass
class BlasstParams:
    threshold_scale: float = field(
        default=0.7, metadata={"help": "a in the paper's law lambda = a / L, L = context length (>= 0)"}
    )
    threshold: float | None = field(
        default=None, metadata={"help": "fixed skip threshold lambda in [0, 1]; overrides threshold_scale"}
    )
    density: float | None = field(
        default=None,
        metadata={"help": "target fraction of NON-skipped scored cells in (0, 1]; calibrates lambda causally"},
    )
    block_size: int = field(default=128, metadata={"help": "query/key tile of the online softmax (16..512)"})
    calib_chunks: int = field(
        default=8, metadata={"help": "query chunks for the causal density calibration (>= 1; each >= 4 blocks)"}
    )

    def __post_init__(self):
        if not self.threshold_scale >= 0 or math.isinf(self.threshold_scale):
            raise ValueError(f"threshold_scale must be a finite number >= 0, got {self.threshold_scale}")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.calib_chunks < 1:
            raise ValueError(f"calib_chunks must be >= 1, got {self.calib_chunks}")


def _log(x: torch.Tensor | float) -> torch.Tensor:
    return torch.log(torch.as_tensor(x, dtype=torch.float64))  # log(0) = -inf: never skip


@register(
    "blasst",
    family="sparse",
    phases=("prefill",),
    params=BlasstParams,
    summary="BLASST: online softmax skips key blocks whose max score is far below the running max (all scored).",
)
class Blasst(Method):
    # Density 1 skips nothing (so does threshold 0): the online softmax equals dense attention.
    exact_params = {"density": 1.0}

    def prefill(self, q, k, v, ctx):
        p = self.params
        B, H, Tq, _ = q.shape
        Tk = k.shape[2]
        kw = dict(window=ctx.window, scale=ctx.scale, block_size=p.block_size)
        if p.density is None or p.density >= 1:
            if p.density is not None:
                log_thr = torch.full((B, 1), float("-inf"), dtype=torch.float64)
            elif p.threshold is not None:
                log_thr = _log(p.threshold).expand(B, 1)
            else:  # lambda = a / L, L = the row's real context length
                L = torch.full((B,), Tk) if ctx.key_valid is None else ctx.key_valid.sum(-1).cpu()
                log_thr = (_log(p.threshold_scale) - _log(L.clamp_min(1)))[:, None]
            res = skip_softmax_attention(
                q, k, v, log_threshold=log_thr.to(q.device).expand(B, Tq), key_valid=ctx.key_valid, **kw
            )
            return AttnOutput(res.out, res.cells, 0.0, res.lse, res.skipped_cells)
        return self._calibrated(q, k, v, ctx, kw)

    def _calibrated(self, q, k, v, ctx, kw):
        """Density mode: chunk by chunk, lambda from the gaps observed on earlier rows only."""
        p = self.params
        B, H, Tq, _ = q.shape
        Tk, dev = k.shape[2], q.device
        t0 = estimate_clock(q)
        edges = histogram_edges(GAP_LO, GAP_HI, GAP_STEP, device=dev)
        L = context_lengths(Tq, Tk, ctx.window, ctx.key_valid, B, dev)  # [B, Tq]
        shift = torch.log(L.clamp_min(1).to(torch.float64))  # gap + ln L_r compares with ln a
        real = torch.ones(B, Tq, dtype=torch.bool, device=dev) if ctx.key_valid is None else ctx.key_valid[:, Tk - Tq :]
        row_cells = (L * real).to(torch.float64) * H  # exact cells of each query row, all heads
        hist = torch.zeros(B, edges.numel() + 1, dtype=torch.float64, device=dev)
        done = torch.zeros(B, dtype=torch.float64, device=dev)  # exact cells of the chunks so far
        kept = torch.zeros(B, dtype=torch.float64, device=dev)  # of those, cells not skipped
        estimate_s = estimate_clock(q) - t0
        outs, lses, cells, skipped = [], [], 0, 0
        for s, e in chunk_bounds(Tq, Tk, p.block_size, p.calib_chunks):
            t0 = estimate_clock(q)
            chunk = row_cells[:, s:e].sum(-1)  # [B]
            keep = ((p.density * (done + chunk) - kept) / chunk.clamp_min(1)).clamp(0, 1)
            log_a = keep_threshold(hist, edges, keep)  # [B]; -inf (skip nothing) on the first chunk
            log_thr = (log_a[:, None] - shift[:, s:e]).clamp_max(0.0)
            estimate_s += estimate_clock(q) - t0
            ke = Tk - Tq + e  # keys up to the chunk's last query
            res = skip_softmax_attention(
                q[:, :, s:e], k[:, :, :ke], v[:, :, :ke], log_threshold=log_thr,
                key_valid=None if ctx.key_valid is None else ctx.key_valid[:, :ke],
                hist_bins=(GAP_LO, GAP_STEP, edges.numel()), gap_shift=shift[:, s:e], **kw,
            )
            t0 = estimate_clock(q)
            hist += res.gap_hist
            done += chunk
            kept += chunk - res.skipped_per_batch.to(torch.float64)
            estimate_s += estimate_clock(q) - t0
            outs.append(res.out)
            lses.append(res.lse)
            cells += res.cells
            skipped += res.skipped_cells
        return AttnOutput(torch.cat(outs, 2), cells, estimate_s, torch.cat(lses, 2), skipped)

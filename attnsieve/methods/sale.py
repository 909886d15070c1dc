"""SALE: select key blocks from low-bit query-key estimates scored against the sink + local mass.

Each query row first computes, exactly, the log-sum-exp of its scores over the sink block and its
local window; then every other key block is estimated from 4- or 8-bit quantised queries and keys,
and a query block keeps a key block when the largest estimated score of one of its rows has a
"relative attention score" exp(s - lse_sink_local) above a threshold tau. The shared block kernel
then attends the selected blocks exactly. Ji, Zhang, Fu, Cui, "SALE: Low-bit Estimation for
Efficient Sparse Attention in Long-context LLM Prefilling", 2025 (arXiv:2505.24179); reference
BirdChristopher/SALE: int4_flash_attn/flash_attn_int4_skip.py (`flash_attn_func_int4_skip`),
int4_flash_attn/quant_triton.py (smoothing and quantisation) and
csrc/flash_attn/src/flash_fwd_int4_sparse_kernel_v2.h (`compute_attn_1rowblock_skipping_v2`).

Hyperparameters (defaults are the reference README's, unscaled by length):
- `bits`: 4 (the paper) or 8; symmetric per-token quantisation of queries and keys after
  smoothing (q - mean q, k - mean k; the exact term mean_q . k_smooth is added back, as the
  reference code does).
- `threshold` (tau): relative attention score a block's best key must exceed. The paper
  calibrates tau per head offline (start at 0.008, halve until the output error is small); its
  README runs tau = 0.004 for every head, our default.
- `density`: target measured density in (0, 1]; overrides `threshold` (calibrated per head, below).
- `block_size`: key block (the reference's block_k_size, 32); also the kernel's query block.
- `query_block`: query rows sharing one selection (the reference's block_q_size, 64; a multiple of
  block_size). Default form only.
- `segment`: keys per estimate segment (the reference's block_seg_size, 128, a multiple of
  block_size): candidates are whole segments after the sink, and the local window is the tail that
  does not fill one, at least `local_window`. Default form only.
- `local_window`: tokens before each query block's end always computed exactly (128).
- `sink_blocks`: first key blocks always computed (1).
- `causal`: False (the paper, default) / True (leak-free, below).
- `calib_chunks`: query chunks of the `causal=True` density calibration.

Estimation (default, `causal=False`, as the reference's two-pass kernel, impl_version 2): queries
and keys are smoothed with the means of all (real) queries and keys of the call; per query block of
`query_block` rows whose keys end at key block NB, the sink block and the local blocks (those after
the last whole `segment` that leaves at least `local_window` tokens) are computed exactly, each row's
log-sum-exp over them fixes its threshold lse + log(tau), and a candidate block is kept for the whole
query block when any real row's largest estimated score in it exceeds that threshold (the reference
ORs the rows of its thread block; no per-row masks). A later query of a block, or a later token
through the smoothing means, changes the keys an earlier query sees: outputs are not
prefix-consistent. When prefill is chunked (Tq < Tk) query blocks are aligned to the absolute grid
and the means are those of the call's queries and all keys. `density` (our addition) sets one tau
per head: the candidate blocks with the highest scores are kept until the call's cells reach the
target. Tau below 1e-5 computes every block, as the reference.

`causal=True` (leak-free, for prefix caching and teacher-forced perplexity): query blocks are
`block_size` rows and the kernel computes the union of a block's selections (all of it counted as
computed cells), but each row's softmax covers only the blocks selected by itself or an earlier row
of its block (the kernel's row_mask), so no row sees a later row's choice; each chunk of query rows
is smoothed with the means of the tokens before its first row (keys re-quantised per chunk, O(T * D)
each); the local window is ceil(local_window / block_size) blocks up to the diagonal. `density`
then calibrates tau causally: the queries are split into `calib_chunks` chunks (at least 4 blocks
each); per head, chunk c's tau is the quantile of the block scores observed on chunks before c,
chosen so the blocks kept so far track the target. The first chunk keeps every block.

Cost, honestly: the estimate scores every (query, key) pair of the causal triangle outside the
sink and local blocks in low bit, so it is quadratic like dense attention, only in integers. On
CPU it runs torch's int8 matrix product (`torch._int_mm`) chunk by chunk (never a Tq x Tk tensor
at once); 4-bit values use the same int8 product, so they cost what 8 bits cost here. The paper's
int4 tensor-core kernel makes this ~11% of dense attention at 128k; estimate_s reports it here.

Deviations:
- Quantisation is per token (the reference's quant_mode 2) with the fixed two-pass threshold; the
  README runs quant_mode 3, whose per-warp scale groups follow the tensor-core tile layout.
- The reference falls back to dense SDPA at or below 1024 tokens; here the rule applies at every
  length (the fallback is a GPU scheduling choice, not part of the selection rule).
- Rows past the end of the prompt (a partial last query block) and padding take no part in a
  selection, and padding is left out of the means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnsieve.kernels import BlockSupport
from attnsieve.methods._block_token import GridCells
from attnsieve.methods._causal_calibration import chunk_bounds, histogram_edges, keep_threshold
from attnsieve.methods.base import SparseMethod
from attnsieve.methods.registry import register
from attnsieve.methods.selection import block_layout, forced_blocks, grid_queries

# Integer score elements one estimate step may hold (rows x keys), ~32 MB of int32.
ESTIMATE_ELEMS = 1 << 23
# Relative-score statistic (natural log) binned for the density calibration.
REL_LO, REL_HI, REL_STEP = -40.0, 20.0, 0.02


@dataclass
class SaleParams:
    bits: int = field(default=4, metadata={"help": "bits of the quantised query-key estimate: 4 or 8"})
    threshold: float = field(
        default=0.004, metadata={"help": "relative attention score tau a block must exceed, in [0, 1]"}
    )
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides threshold when set"}
    )
    block_size: int = field(default=32, metadata={"help": "tokens per key block and kernel query block (16..512)"})
    query_block: int = field(
        default=64, metadata={"help": "query rows sharing one selection (multiple of block_size, <= 1024; paper)"}
    )
    segment: int = field(
        default=128, metadata={"help": "keys per estimate segment (multiple of block_size, <= 4096; paper)"}
    )
    local_window: int = field(default=128, metadata={"help": "tokens before each query block's end always kept"})
    sink_blocks: int = field(default=1, metadata={"help": "first key blocks always kept (>= 0)"})
    causal: bool = field(
        default=False,
        metadata={"help": "False (paper): a query block's union, means of all tokens; True: per-row, earlier means"},
    )
    calib_chunks: int = field(
        default=8, metadata={"help": "query chunks for the causal density calibration (>= 1; each >= 4 blocks)"}
    )

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if not (self.query_block % self.block_size == 0 and self.query_block <= 1024):
            raise ValueError(
                f"query_block must be a multiple of block_size ({self.block_size}) up to 1024, got {self.query_block}"
            )
        if not (self.segment % self.block_size == 0 and self.segment <= 4096):
            raise ValueError(
                f"segment must be a multiple of block_size ({self.block_size}) up to 4096, got {self.segment}"
            )
        if self.local_window < 1:
            raise ValueError(f"local_window must be >= 1 token, got {self.local_window}")
        if self.sink_blocks < 0:
            raise ValueError(f"sink_blocks must be >= 0, got {self.sink_blocks}")
        if self.calib_chunks < 1:
            raise ValueError(f"calib_chunks must be >= 1, got {self.calib_chunks}")


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token quantisation: (int8 values in [-(2^(bits-1) - 1), 2^(bits-1) - 1], scale)."""
    top = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / scale[..., None]).clamp_(-top, top).to(torch.int8), scale


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [m, k] x int8 [k, n]: torch's int8 GEMM on CPU (int32 out); elsewhere a float32 product,
    exact for these integers while k <= 1040 (CUDA's int8 GEMM has shape constraints)."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b)
    return a.float() @ b.float()


class RunningMeans:
    """Means of the real queries (per head) and keys (per KV head) before any absolute position."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None):
        B, _, Tq, D = q.shape
        Tk = k.shape[2]
        real = torch.ones(B, Tk, device=k.device) if key_valid is None else key_valid.to(k.dtype)
        pad = (0, 0, 1, 0)  # csum[:, :, t] = sum over positions < t
        self.k_sum = torch.nn.functional.pad((k * real[:, None, :, None]).cumsum(2), pad)  # [B, Hkv, Tk+1, D]
        self.q_sum = torch.nn.functional.pad((q * real[:, None, Tk - Tq :, None]).cumsum(2), pad)
        self.k_cnt = torch.nn.functional.pad(real.cumsum(-1), (1, 0))  # [B, Tk + 1]
        self.q_cnt = torch.nn.functional.pad(real[:, Tk - Tq :].cumsum(-1), (1, 0))
        self.lead = Tk - Tq

    def before(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean query [B, H, D], mean key [B, Hkv, D]) over real tokens at positions < pos (0 if none)."""
        i = min(max(pos - self.lead, 0), self.q_sum.shape[2] - 1)
        pos = min(pos, self.k_sum.shape[2] - 1)
        q_mean = self.q_sum[:, :, i] / self.q_cnt[:, i].clamp_min(1)[:, None, None]
        k_mean = self.k_sum[:, :, pos] / self.k_cnt[:, pos].clamp_min(1)[:, None, None]
        return q_mean, k_mean


class GlobalMeans:
    """Means of all real queries (per head) and keys (per KV head) of the call, as the reference smooths."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None):
        Tq, Tk = q.shape[2], k.shape[2]
        real = torch.ones(k.shape[0], Tk, device=k.device) if key_valid is None else key_valid.to(k.dtype)
        q_real = real[:, Tk - Tq :]
        self.q_mean = (q * q_real[:, None, :, None]).sum(2) / q_real.sum(-1).clamp_min(1)[:, None, None]
        self.k_mean = (k * real[:, None, :, None]).sum(2) / real.sum(-1).clamp_min(1)[:, None, None]

    def before(self, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_mean, self.k_mean


def paper_layout(layout, bs: int, query_block: int, segment: int, local_window: int, sink_blocks: int):
    """(forced [B, NQ, NK], candidates [B, NQ, NK], reference query block of each grid block [NQ]).

    Follows `compute_attn_1rowblock_skipping_v2`: for a query block of `query_block` rows whose keys end
    in key block NB - 1, the N blocks after the sink block(s) are cut into segments of S blocks from the
    first; with remain = N - S * ceil(N / S) (<= 0), the first ceil(N / S) - ceil((L - remain) / S)
    segments are the candidates and the blocks after them, at least L, the local window.
    """
    dev = layout.allowed.device
    S, L, R = segment // bs, -(-local_window // bs), query_block // bs
    qb = torch.arange(layout.first_qb, layout.first_qb + layout.n_q, device=dev)
    ref_block = qb // R - layout.first_qb // R  # [NQ]
    n_blocks = torch.clamp((qb // R + 1) * R, max=layout.n_k)  # [NQ] key blocks up to the reference block's end
    lead = layout.sink[:, None] + sink_blocks  # [B, 1] first block after the sinks
    N = n_blocks[None] - lead  # [B, NQ]
    segs = torch.div(N + S - 1, S, rounding_mode="floor")
    remain = N - segs * S
    segs = (segs - torch.div(L - remain + S - 1, S, rounding_mode="floor")).clamp_min(0)
    local_start = lead + segs * S  # [B, NQ]
    kb = torch.arange(layout.n_k, device=dev)[None, None, :]
    sinks = (kb >= layout.sink[:, None, None]) & (kb < lead[..., None])
    forced = (sinks | (kb >= local_start[..., None])) & layout.allowed
    cand = (kb >= lead[..., None]) & (kb < local_start[..., None]) & layout.allowed
    return forced, cand, ref_block


def density_selection(best, density, forced, ref_block, Tq, Tk, bs, key_valid):
    """[B, H, NM, NK] bool: per head, the highest-scoring candidate blocks whose cells fit `density`."""
    B, H, n_ref, n_k = best.shape
    grid = GridCells.build(Tq, Tk, bs, key_valid, B, best.device)
    total = grid.exact.sum(-1).double()  # [B] cells of one head
    fixed = grid.block_cells(forced[:, None], 0)[:, 0].sum(-1).double()  # [B]
    rows = torch.zeros(B, n_ref, dtype=torch.float64, device=best.device).index_add_(1, ref_block, grid.rows.double())
    weight = (rows[:, :, None] * grid.keys[:, None, :].double()).flatten(1)  # [B, NM*NK] candidates: wholly visible
    vals, order = best.flatten(2).sort(-1, descending=True)  # [B, H, NM*NK]
    cells = torch.gather(weight[:, None].expand(-1, H, -1), 2, order).cumsum(-1)
    budget = (density * total - fixed)[:, None, None]
    keep = (cells <= budget) & torch.isfinite(vals)
    return torch.zeros_like(keep).scatter_(2, order, keep).view(B, H, n_ref, n_k)


@register(
    "sale",
    family="sparse",
    phases=("prefill",),
    params=SaleParams,
    summary="SALE: 4/8-bit query-key estimates; a query block keeps key blocks whose relative score beats tau.",
)
class Sale(SparseMethod):
    exact_params = {"density": 1.0}  # degenerate setting: every causal block, equals dense attention

    def support(self, q, k, ctx):
        return self._causal_support(q, k, ctx) if self.params.causal else self._paper_support(q, k, ctx)

    def _paper_support(self, q, k, ctx):
        """The reference's selection: one union per query block of `query_block` rows, all-token means."""
        p = self.params
        B, H, Tq, D = q.shape
        Tk, bs, dev = k.shape[2], p.block_size, q.device
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, dev)
        first, n_q, n_k = layout.first_qb, layout.n_q, layout.n_k
        keep_all = p.density is not None and p.density >= 1 or p.density is None and p.threshold < 1e-5
        forced, cand, ref_block = paper_layout(layout, bs, p.query_block, p.segment, p.local_window, p.sink_blocks)
        if keep_all or not bool(cand.any()):
            return BlockSupport.from_mask(layout.allowed[:, None].expand(B, H, n_q, n_k), bs)

        qg, rows = grid_queries(q.float(), Tk, bs)  # [B, H, NQ, bs, D], [NQ, bs]
        valid = torch.zeros(B, n_k * bs, dtype=torch.bool, device=dev)
        valid[:, :Tk] = True if ctx.key_valid is None else ctx.key_valid
        real = rows[None] & valid.view(B, n_k, bs)[:, first:]  # [B, NQ, bs] real query rows
        means = GlobalMeans(q.float(), k.float(), ctx.key_valid)
        n_forced = forced.sum(-1).amax(0).tolist()  # [NQ] one read for every chunk's sink + local lists
        R = p.query_block // bs
        n_ref = (first + n_q - 1) // R - first // R + 1  # ref_block[-1] + 1, from the grid alone
        # [B, H, NM, NK]: per query block of the reference and key block, the best row's relative score
        best = torch.full((B, H, n_ref, n_k), float("-inf"), device=dev)
        chunk_rows = max(1, ESTIMATE_ELEMS // ((H // k.shape[1]) * bs * max(1, Tk)))
        for s in range(0, n_q, chunk_rows):
            e = min(s + chunk_rows, n_q)
            rel = self._relative_scores(qg, k, means, s, e, first, forced, n_forced, cand, valid, real, ctx)
            rows_best = rel.amax(3)  # [B, H, e - s, NK]
            idx = ref_block[s:e, None].expand(B, H, -1, n_k)
            best.scatter_reduce_(2, idx, rows_best, "amax")  # the union over a reference block's rows
        if p.density is None:
            sel = best > math.log(p.threshold)  # strictly above lse + log(tau), as the reference
        else:
            sel = density_selection(best, p.density, forced, ref_block, Tq, Tk, bs, ctx.key_valid)
        mask = (sel[:, :, ref_block] | forced[:, None]) & layout.allowed[:, None]  # [B, H, NQ, NK]
        return BlockSupport.from_mask(mask, bs)

    def _causal_support(self, q, k, ctx):
        p = self.params
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G, bs, dev = H // Hkv, p.block_size, q.device
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, dev)
        first, n_q, n_k = layout.first_qb, layout.n_q, layout.n_k
        forced = forced_blocks(layout, p.sink_blocks, max(1, -(-p.local_window // bs)))  # [B, NQ, NK]
        cand = layout.allowed & ~forced  # blocks that need an estimate
        keep_all = p.density is not None and p.density >= 1 or p.density is None and p.threshold == 0
        if keep_all or not bool(cand.any()):
            return BlockSupport.from_mask(layout.allowed[:, None].expand(B, H, n_q, n_k), bs)

        qg, rows = grid_queries(q.float(), Tk, bs)  # [B, H, NQ, bs, D], [NQ, bs]
        valid = torch.zeros(B, n_k * bs, dtype=torch.bool, device=dev)
        valid[:, :Tk] = True if ctx.key_valid is None else ctx.key_valid
        real = rows[None] & valid.view(B, n_k, bs)[:, first:]  # [B, NQ, bs] real query rows

        means = RunningMeans(q.float(), k.float(), ctx.key_valid)
        n_forced = forced.sum(-1).amax(0).tolist()  # [NQ] one read for every chunk's sink + local lists

        calibrate = p.density is not None
        if calibrate:
            edges = histogram_edges(REL_LO, REL_HI, REL_STEP, device=dev)
            hist = torch.zeros(B, H, edges.numel() + 1, dtype=torch.float64, device=dev)
            has_rows = real.any(-1)  # [B, NQ]
            want = (p.density * (layout.n_avail.double() - 0.5) + 0.5) * has_rows  # blocks per query block
            kept = torch.zeros(B, H, dtype=torch.float64, device=dev)
            target = torch.zeros(B, dtype=torch.float64, device=dev)
        log_tau = torch.full((B, H), math.log(p.threshold), dtype=torch.float64, device=dev)
        chunk_rows = max(1, ESTIMATE_ELEMS // (G * bs * max(1, Tk)))

        blocks, row_masks = [], []
        for cs, ce in self._grid_chunks(Tq, Tk, n_q, first, calibrate):
            if calibrate:
                target += want[:, cs:ce].sum(-1)
                need = target[:, None] - kept - forced[:, cs:ce].sum((-1, -2))[:, None]
                n_cand = (cand[:, cs:ce] & has_rows[:, cs:ce, None]).sum((-1, -2))[:, None]
                keep = (need / n_cand.clamp_min(1)).clamp(0, 1)  # [B, H]
                log_tau = keep_threshold(hist, edges, keep)  # -inf (keep every block) on the first chunk
            for s in range(cs, ce, chunk_rows):
                e = min(s + chunk_rows, ce)
                # [B, H, nqc, bs, NK]: each candidate block's best estimated score minus lse_sink_local
                rel = self._relative_scores(qg, k, means, s, e, first, forced, n_forced, cand, valid, real, ctx)
                sel = rel > log_tau[:, :, None, None, None]
                best = rel.amax(3)  # [B, H, nqc, NK] the query block's best row per block
                union = sel.any(3) | forced[:, None, s:e]
                if calibrate:
                    seen = torch.isfinite(best)
                    bins = torch.bucketize(best[seen].double(), edges)
                    bh = torch.nonzero(seen)[:, :2]
                    hist.index_put_((bh[:, 0], bh[:, 1], bins), torch.ones_like(bins, dtype=torch.float64),
                                    accumulate=True)
                    kept += union.sum((-1, -2))
                sup = BlockSupport.from_mask(union, bs)
                slots = sup.blocks.clamp_min(0)  # [B, H, nqc, K]
                # A row attends the blocks selected by itself or any earlier row of its query block
                # (all computed anyway), never by a later one.
                own = (sel.cumsum(3) > 0) | forced[:, None, s:e, None, :]  # [B, H, nqc, bs, NK]
                rm = torch.gather(own, 4, slots[:, :, :, None, :].expand(-1, -1, -1, bs, -1))
                blocks.append(sup.blocks)
                row_masks.append(rm & (sup.blocks >= 0)[:, :, :, None, :])
        width = max(b.shape[-1] for b in blocks)
        blocks = torch.cat([torch.nn.functional.pad(b, (0, width - b.shape[-1]), value=-1) for b in blocks], 2)
        row_mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[-1])) for m in row_masks], 2)
        return BlockSupport(blocks, bs, row_mask)

    def _grid_chunks(self, Tq, Tk, n_q, first, calibrate):
        """Query-block ranges (grid-local) that share one threshold: calibration chunks, or all."""
        if not calibrate:
            return [(0, n_q)]
        bs = self.params.block_size
        out = []
        for s, e in chunk_bounds(Tq, Tk, bs, self.params.calib_chunks):
            out.append(((Tk - Tq + s) // bs - first, (Tk - Tq + e - 1) // bs - first + 1))
        return out

    def _relative_scores(self, qg, k, means, s, e, first, forced, n_forced, cand, valid, real, ctx):
        """[B, H, e - s, bs, NK]: per query row and candidate key block, the block's largest low-bit
        score minus the row's exact log-sum-exp over its sink + local keys; -inf elsewhere.

        n_forced: per grid query block, the most forced blocks of a batch row (a host list)."""
        B, H, _, bs, D = qg.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G, n, n_k, dev = H // Hkv, e - s, forced.shape[-1], qg.device
        bits = self.params.bits
        width = max(1, *n_forced[s:e])
        lse = self._sink_local_lse(qg[:, :, s:e], k, forced[:, s:e], width, valid, first + s, ctx)  # [B, H, n, bs]
        kend = min(Tk, (first + e) * bs)  # keys past the chunk's last row are never candidates
        nkc = -(-kend // bs)
        # Smoothing (q - mean q, k - mean k) with means over the tokens before this chunk's rows.
        q_mean, k_mean = means.before((first + s) * bs)  # [B, H, D], [B, Hkv, D]
        k_s = k[:, :, :kend].float() - k_mean[:, :, None]  # [B, Hkv, kend, D]
        kq, sk = quantize(k_s, bits)  # int8 [B, Hkv, kend, D], [B, Hkv, kend]
        q_c = qg[:, :, s:e].reshape(B, H, n * bs, D)
        qq, sq = quantize(q_c - q_mean[:, :, None], bits)  # int8 [B, H, n * bs, D], [B, H, n * bs]
        qmk = torch.einsum("bhgd,bhtd->bhgt", q_mean.view(B, Hkv, G, D), k_s)  # exact mean_q . k_s
        qkm = torch.einsum("bhgrd,bhd->bhgr", q_c.view(B, Hkv, G, n * bs, D), k_mean)  # q . mean_k: per row
        need_mask = ctx.window is not None or ctx.key_valid is not None  # a no-op where every key is real
        q_pos = ((first + s) * bs + torch.arange(n * bs, device=dev))[:, None]  # [n * bs, 1]
        k_pos = torch.arange(kend, device=dev)[None, :]
        best = torch.empty(B, Hkv, G, n * bs, nkc, device=dev)
        for b in range(B):
            for h in range(Hkv):
                rows = qq[b, h * G : (h + 1) * G].reshape(G * n * bs, D)
                # The quadratic low-bit part: int8 x int8 -> int32 over every (row, key) of the chunk.
                acc = int_matmul(rows, kq[b, h].t()).view(G, n * bs, kend)
                acc = torch.mul(acc, sk[b, h])  # dequantise: int32 -> float in the same pass
                torch.addcmul(qmk[b, h, :, None, :], acc, sq[b, h * G : (h + 1) * G, :, None], out=acc)
                if need_mask:  # padding keys, and candidate blocks at the window's far edge
                    ok = valid[b, None, :kend]
                    if ctx.window is not None:
                        ok = ok & (q_pos - k_pos < ctx.window)
                    acc.masked_fill_(~ok, float("-inf"))
                if kend < nkc * bs:
                    acc = torch.nn.functional.pad(acc, (0, nkc * bs - kend), value=float("-inf"))
                best[b, h] = acc.view(G, n * bs, nkc, bs).amax(-1)
        best = (best + qkm[..., None]).view(B, H, n, bs, nkc) * ctx.scale  # q . mean_k: after the max
        rel = torch.full((B, H, n, bs, n_k), float("-inf"), device=dev)
        rel[..., :nkc] = best - lse[..., None]
        ok = cand[:, None, s:e, None, :] & real[:, None, s:e, :, None]
        return rel.masked_fill_(~ok, float("-inf"))

    def _sink_local_lse(self, qg, k, forced, width, valid, first_qb, ctx):
        """[B, H, n, bs] exact log-sum-exp of each query row's scores over its forced blocks (at most
        `width` per row)."""
        B, H, n, bs, D = qg.shape
        Hkv = k.shape[1]
        G, dev = H // Hkv, qg.device
        slots = BlockSupport.from_mask(forced[:, None], bs, width).blocks[:, 0]  # [B, n, F]
        F = slots.shape[-1]
        k_pos = slots.clamp_min(0)[..., None] * bs + torch.arange(bs, device=dev)  # [B, n, F, bs]
        k_pos = k_pos.view(B, n, F * bs)
        kp = torch.nn.functional.pad(k.float(), (0, 0, 0, valid.shape[1] - k.shape[2]))
        kg = torch.gather(kp[:, :, None].expand(B, Hkv, n, -1, D), 3,
                          k_pos[:, None, :, :, None].expand(B, Hkv, n, F * bs, D))  # [B, Hkv, n, F*bs, D]
        s = torch.einsum("bhgnrd,bhnkd->bhgnrk", qg.view(B, Hkv, G, n, bs, D), kg) * ctx.scale
        q_pos = (first_qb + torch.arange(n, device=dev))[:, None] * bs + torch.arange(bs, device=dev)  # [n, bs]
        diff = q_pos[None, :, :, None] - k_pos[:, :, None, :]  # [B, n, bs, F*bs]
        ok = (diff >= 0) & torch.gather(valid, 1, k_pos.view(B, -1)).view(B, n, 1, F * bs)
        ok = ok & (slots >= 0).repeat_interleave(bs, -1)[:, :, None, :]
        if ctx.window is not None:
            ok = ok & (diff < ctx.window)
        s = s.masked_fill(~ok[:, None, None], float("-inf"))
        return torch.logsumexp(s, -1).view(B, H, n, bs)

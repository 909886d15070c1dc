"""TokenSelect: token-level key selection by a soft vote of the heads, plus sinks and a local window.

For a chunk of queries, every head scores each earlier key token by the dot product with the
chunk's mean query, turns its scores into a softmax, and the heads' softmaxes are summed (the
"head soft vote", so no single head with large logits dominates); the top-k tokens of the vote,
the first `n_init` tokens and the `n_local` most recent ones are attended exactly. Wu et al.,
"TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via Dynamic
Token-Level KV Cache Selection", EMNLP 2025 (arXiv:2411.02886), Eq. 7 and Section 5.2
(chunk-wise selection in prefill); defaults from the authors' configs (pzs19/TokenSelect).

Hyperparameters:
- `top_k`: selected tokens per query chunk. Paper: 2048 for contexts up to 128k and beyond;
  None (default) scales it to the context, round(2048 * Tk / 131072), at least 1.
- `n_init`: first real tokens always attended (128).
- `n_local`: most recent tokens always attended (512), kept as whole key blocks:
  ceil(n_local / block_size) blocks, the diagonal included.
- `block_size`: query chunk sharing one selection, and the block of the local window (64).
- `density`: when set, overrides the three budgets so the measured density lands near it: the
  per-query token budget b of a window of the same density is split in the paper's ratio
  n_init : n_local : top_k = 128 : 512 : 2048, and top_k is then set so the predicted density
  (local and sink cells counted per block pair, selected tokens per row) is nearest the target.
  Density 1 keeps every block (dense).

Execution: the local blocks run on the block-sparse kernel and the sink + selected tokens on the
token-gather kernel (tokens inside a local block dropped by `drop_covered`), merged through
their log-sum-exp; cells = block cells + token cells. Selection time is reported as estimate_s.

Deviations:
- Causality: the paper scores a chunk with the mean of the chunk's own queries, so a later query
  of the chunk changes which tokens an earlier one sees. Here chunk j is scored with the mean of
  chunk j - 1's real queries (lagged by one chunk), and candidates lie before chunk j's local
  window, so nothing a query sees depends on a later token. The first chunk has no selection
  (its sink and local blocks only). Chunks are 64 tokens, not the paper's 512, so the lagged
  representative stays close to the queries it serves; scoring is one row per chunk against the
  earlier keys, O(Tq * Tk / block_size * D) per head, done in bounded row chunks.
  Consequence: at the end of a prompt only the question's own queries look for the needle, and
  no chunk-shared selection can use them causally; the first answer token comes from prefill
  (decoding is exact here, not the paper's per-query selection). On a 4k passkey prompt with
  Gemma 3 270M the key is found by a (leaky) selection with each chunk's last query but not by
  the lagged one even at density 0.5, nor by the paper's own chunk mean at 0.2.
- Voting is per KV group (each KV head gathers its own tokens); the reference sums over all
  heads of the layer. With one KV head (Gemma 3) the two coincide.
- Scores use the post-RoPE keys the layer attends; the reference scores its pre-RoPE key cache
  against queries rotated to a fixed position (part of its length extrapolation). As in the
  paper and the reference, the per-head softmax is over raw dot products (no 1/sqrt(d) scale);
  the vote is summed in the log domain, so tokens far below a head's maximum do not underflow
  to ties.
- The Selection Cache (decoding) is not used: decoding steps are exact.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from attnsieve.kernels import (
    BlockSupport,
    block_grid,
    drop_covered,
)
from attnsieve.methods._static import pair_cells
from attnsieve.methods.base import SparseMethod
from attnsieve.methods.registry import register
from attnsieve.methods.selection import block_layout, forced_blocks, grid_queries
from attnsieve.methods.window import first_real_positions, window_for_density

PAPER_TOP_K, PAPER_N_INIT, PAPER_N_LOCAL, PAPER_CONTEXT = 2048, 128, 512, 131072
# Largest number of score elements one selection step may hold (~64 MB fp32).
SCORE_CHUNK_ELEMS = 1 << 24


@dataclass
class TokenSelectParams:
    top_k: int | None = field(
        default=None, metadata={"help": "selected tokens per query chunk (>= 0); None: 2048 at 128k, scaled"}
    )
    n_init: int = field(default=128, metadata={"help": "first real tokens always attended (>= 0)"})
    n_local: int = field(default=512, metadata={"help": "recent tokens always attended, as whole blocks (>= 1)"})
    block_size: int = field(default=64, metadata={"help": "query chunk sharing one selection; local block (16..512)"})
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides top_k, n_init, n_local"}
    )

    def __post_init__(self):
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 or None, got {self.top_k}")
        if self.n_init < 0:
            raise ValueError(f"n_init must be >= 0, got {self.n_init}")
        if self.n_local < 1:
            raise ValueError(f"n_local must be >= 1, got {self.n_local}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")


def soft_vote(rep: torch.Tensor, k: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """log of the head soft vote: log sum_h softmax_t(rep_h . k_t) over candidate tokens.

    rep: [B, H, n, D] one representative query per row; k: [B, Hkv, Tk, D];
    cand: [B, n, Tk] bool. Returns [B, Hkv, n, Tk] (-inf off the candidates), summed over the
    heads of each KV group.
    """
    B, H, n, D = rep.shape
    Hkv = k.shape[1]
    scores = rep.float().view(B, Hkv, H // Hkv, n, D) @ k.float()[:, :, None].transpose(-1, -2)  # [B, Hkv, G, n, Tk]
    scores = scores.masked_fill(~cand[:, None, None], float("-inf"))
    log_p = scores - torch.logsumexp(scores, dim=-1, keepdim=True)
    log_p = log_p.masked_fill(~cand[:, None, None], float("-inf"))  # rows without candidates: -inf, not nan
    return torch.logsumexp(log_p, dim=2)


def lagged_representatives(q: torch.Tensor, Tk: int, bs: int, key_valid: torch.Tensor | None):
    """([B, H, NQ, D] mean of the previous chunk's real queries, [B, NQ] whether it has any)."""
    qg, rows = grid_queries(q.float(), Tk, bs)  # [B, H, NQ, bs, D], [NQ, bs]
    B, _, n_q = qg.shape[:3]
    first = (Tk - q.shape[2]) // bs
    real = rows[None].expand(B, -1, -1)
    if key_valid is not None:  # padding queries never shape a selection
        pad = (first + n_q) * bs - Tk
        valid = torch.nn.functional.pad(key_valid.to(torch.bool), (0, pad)).view(B, -1, bs)[:, first:]
        real = real & valid
    count = real.sum(-1)  # [B, NQ]
    mean = (qg * real[:, None, :, :, None]).sum(3) / count.clamp_min(1)[:, None, :, None]
    rep = torch.zeros_like(mean)
    rep[:, :, 1:] = mean[:, :, :-1]
    has = torch.zeros_like(count, dtype=torch.bool)
    has[:, 1:] = count[:, :-1] > 0
    return rep, has


def select_tokens(q, k, ctx, bs: int, local_blocks: int, n_init: int, top_k: int) -> torch.Tensor:
    """[B, Hkv, NQ, top_k] key positions chosen by the soft vote per query chunk (-1: unused).

    Candidates of chunk j: real keys before its local window, not among the first n_init real
    tokens, inside the layer's window of the chunk's first query; scored with chunk j - 1's mean.
    """
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    first = (Tk - Tq) // bs
    rep, has = lagged_representatives(q, Tk, bs, ctx.key_valid)
    n_q = rep.shape[2]
    out = torch.full((B, Hkv, n_q, top_k), -1, dtype=torch.long, device=q.device)
    if top_k == 0:
        return out
    pos = torch.arange(Tk, device=q.device)
    valid = torch.ones(B, Tk, dtype=torch.bool, device=q.device) if ctx.key_valid is None else ctx.key_valid.bool()
    rank = valid.long().cumsum(-1) - 1
    keyable = valid & (rank >= n_init)  # [B, Tk]
    g = torch.arange(first, first + n_q, device=q.device)
    end = (g - local_blocks + 1) * bs  # [NQ] candidates lie before the local window
    # Row chunks: bounded memory, and each chunk scores only the keys before its last window end.
    step = max(1, min(SCORE_CHUNK_ELEMS // max(1, B * H * Tk), -(-n_q // 8)))
    for s in range(0, n_q, step):
        e = min(s + step, n_q)
        span = int(end[e - 1].clamp(0, Tk))  # keys [0, span) hold every candidate of these rows
        if span == 0:
            continue
        kpos = pos[:span]
        cand = keyable[:, None, :span] & (kpos[None, None, :] < end[s:e, None]) & has[:, s:e, None]  # [B, n, span]
        if ctx.window is not None:
            first_q = (g[s:e] * bs).clamp_min(Tk - Tq)
            cand &= kpos[None, None, :] > (first_q - ctx.window)[None, :, None]
        vote = soft_vote(rep[:, :, s:e], k[:, :, :span], cand)  # [B, Hkv, n, span]
        vals, idx = vote.topk(min(top_k, span), dim=-1)
        out[:, :, s:e, : idx.shape[-1]] = torch.where(vals > float("-inf"), idx, -1)
    return out


def density_budgets(density: float, Tq: int, Tk: int, bs: int, window: int | None) -> tuple[int, int, int]:
    """(local_blocks, n_init, top_k) whose predicted density on an unpadded input is nearest `density`."""
    first, n_q, n_k = block_grid(Tq, Tk, bs)
    if density >= 1:
        return n_k, 0, 0
    budget = window_for_density(density, Tq, Tk, 0)  # tokens per query of a window this dense
    paper = PAPER_N_INIT + PAPER_N_LOCAL + PAPER_TOP_K
    n_init = round(budget * PAPER_N_INIT / paper)
    local = max(1, round(budget * PAPER_N_LOCAL / paper / bs))
    cells = pair_cells(Tq, Tk, bs, window)  # [NQ, NK]
    g = torch.arange(first, first + n_q)  # grid index of each query chunk
    d = g[:, None] - torch.arange(n_k)[None, :]
    rows = ((g + 1) * bs).clamp_max(Tk) - (g * bs).clamp_min(Tk - Tq)  # [NQ] query rows per chunk
    local_cells = torch.where((d >= 0) & (d < local), cells, torch.zeros_like(cells)).sum(-1)
    local_start = ((g - local + 1) * bs).clamp_min(0)
    sink_cells = rows * local_start.clamp_max(n_init)
    cand = (local_start - n_init).clamp_min(0)
    total = max(1, int(cells.sum()))
    fixed = int((local_cells + sink_cells).sum())

    def predicted(top_k: int) -> float:
        return (fixed + int((rows * cand.clamp_max(top_k)).sum())) / total

    lo, hi = 0, Tk  # largest top_k with predicted <= density, then the nearer of it and the next
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if predicted(mid) <= density else (lo, mid - 1)
    top_k = lo + 1 if abs(predicted(lo + 1) - density) < abs(predicted(lo) - density) else lo
    return local, n_init, top_k


@register(
    "tokenselect",
    family="sparse",
    phases=("prefill",),
    params=TokenSelectParams,
    summary="TokenSelect: per-chunk top-k key tokens by a soft vote of the heads' softmaxes, + sinks + local.",
)
class TokenSelect(SparseMethod):
    selects_tokens = True  # support() adds single key tokens to its blocks
    exact_params = {"density": 1.0}  # degenerate setting: equals dense attention

    def support(self, q, k, ctx):
        p = self.params
        B, H, Tq, _ = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        bs = p.block_size
        if p.density is not None:
            local, n_init, top_k = density_budgets(p.density, Tq, Tk, bs, ctx.window)
        else:
            local, n_init = math.ceil(p.n_local / bs), p.n_init
            top_k = max(1, round(PAPER_TOP_K * Tk / PAPER_CONTEXT)) if p.top_k is None else p.top_k
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, q.device)
        local = min(local, layout.n_k)
        blocks = BlockSupport.from_mask(forced_blocks(layout, 0, local)[:, None].expand(B, Hkv, -1, -1), bs)
        tokens = select_tokens(q, k, ctx, bs, local, n_init, top_k)  # [B, Hkv, NQ, top_k]
        sinks = first_real_positions(ctx.key_valid, B, Tk, n_init, q.device)  # [B, n_init]
        tokens = torch.cat([sinks[:, None, None].expand(-1, Hkv, layout.n_q, -1), tokens], dim=-1)
        tokens = drop_covered(tokens, blocks)
        return dataclasses.replace(blocks, tokens=tokens)

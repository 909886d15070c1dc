"""DHSA: dynamic hierarchical sparse attention, chunk-level similarity upsampled to token selection.

The keys are cut into variable-length chunks at the positions where the key stream changes most;
each chunk is summarised by its mean key scaled by sqrt(chunk length), each query block by its
pooled queries, and the chunk-to-chunk similarity, upsampled to every token of a chunk, ranks the
tokens a query block attends (highest-scoring chunks first, until the token budget is spent) on top
of a few global tokens and its most recent keys. Xiong, Zou, Fekri and Cho, "Long-Context Modeling with
Dynamic Hierarchical Sparse Attention for On-Device LLMs", NeurIPS 2025 (arXiv:2510.24606); details
from the reference implementation of that version (xiongsiheng/DHSA, `legacy/utils`).

Hyperparameters (defaults are the reference's):
- `token_budget` (1024, the reference NIAH runs up to 8k): key tokens per query block, the global
  and local tokens included.
- `density`: when set, overrides `token_budget` with the budget whose measured density lands
  near it (global and local tokens and the dense tail count inside it); 1.0 is exact attention.
- `block_size` (64): query block and key block of the kernel.
- `boundary_window` (4): keys on each side of a candidate boundary (the reference predictor's window).
- `chunk_beta` (8): at most (Tk // block_size) * chunk_beta chunk boundaries (`dhsa_chunk_beta`).
- `nms_window` (8): a candidate boundary within this many tokens of a kept one is suppressed.
- `global_tokens` (128): first tokens every block attends, taking slots of the budget.
- `local_tokens` (128): most recent keys up to each query block's end, always kept (the reference's
  `dhsa_sdpa` default, which its callers keep).
- `instruction_tokens` (64): the last queries of a call attend densely (the reference's
  "instruction" part, whole query blocks); 0 disables it. With `density`, it is dropped when the
  target is below the floor it sets together with the own and first blocks (short inputs, low density).
- `length_norm` (True): scale pooled queries and chunk means by sqrt(length) ("avgpool_norm").
- `causal` (False): False (the paper) estimates a block from its own queries and chunks of the whole
  sequence; True is the leak-free form (below).

Estimation (default, `causal=False`), as the reference implementation does it (xiongsiheng/DHSA,
legacy/utils/helper.py: `predict_boundaries` with `_select_boundary_candidates`, `_obtain_dhsa_mask`
and `dhsa_sdpa`; parameters from legacy/utils/monkeypatch.py):
- Boundaries: every gap of the whole key sequence is scored (below), ranked best first, and kept
  greedily unless it lies within `nms_window` tokens of one already kept (non-maximum suppression),
  up to (Tk // block_size) * chunk_beta boundaries. The instruction start is a boundary from the
  outset (at Tk - instruction_tokens + 1, where the reference puts it) and no gap after it is
  considered. Later keys move earlier boundaries: the chunks look ahead.
- A query block is its own real queries averaged over heads and pooled (mean, times sqrt(rows));
  a chunk is its mean key (over heads) times sqrt(its length), the whole chunk even where it runs
  past the query block. Their dot product, upsampled to every token of the chunk, scores the keys
  up to the block's end (its own keys included).
- Block j keeps the first `global_tokens` tokens and its `local_tokens` most recent keys (up to its
  end, its own keys included), each taking slots of `token_budget`, and fills the remaining slots
  with the best-scoring keys between them (ties: the earlier token first).
When prefill is chunked (Tq < Tk), query blocks pool the chunk's own queries and the boundaries
rank all Tk keys.

`causal=True` (leak-free, for prefix-consistent outputs): one boundary per key block, its most
dissimilar gap among those whose right window ends inside the block, so a boundary depends only on
keys of its own block and before (same chunk count as L / block_size, lengths from 1 to about 2
blocks); query block j ranks only chunks that end before block j (the chunk that straddles its
start is cut there and summarised from its known part) and is represented by the pooled queries of
block j - 1 (its own first query for the first block of a call, `_lagged.py`); it keeps its own
block and the global blocks (whole blocks, at least the first one, shrinking with a small budget)
and fills the rest of the budget with tokens before block j. `chunk_beta`, `nms_window` and
`local_tokens` do not apply.

Deviations from the reference, and why:
- Boundary scores: the paper predicts them with a trained predictor (a window encoder, feature
  fusion, MLP) whose weights are not available here; we use its training-free core: the cosine
  dissimilarity between the mean keys of the `boundary_window` keys left and right of a gap (heads
  concatenated, as the predictor's input). The reference keeps only predictor scores above a
  threshold (1.1); the cosine score has no calibrated threshold, so every gap competes and the
  suppression alone limits the count (chunks of nms_window + 1 to 2 * nms_window + 1 tokens with
  the default chunk_beta).
- Global tokens: the reference scores every key up to the block's end (global ones included),
  sorts the recent and the best-scoring keys by position, and writes the global tokens over the
  first `global_tokens` slots of that list, so the keys displaced are the earliest selected ones,
  whatever their scores (a needle early in the context loses its slot to the global tokens unless
  enough other selected keys precede it). We give the global tokens their slots and fill the rest
  with the best-scoring keys (as `causal=True` does), so what is dropped depends on scores only;
  the two agree whenever the selection's earliest keys are the global tokens themselves.
- Global tokens run as whole key blocks (from the first real key, rounded out to blocks); the
  diagonal block is always attended (the recent keys cover it whenever the budget exceeds
  global_tokens + block_size); the instruction tail is whole query blocks; ties are broken by
  position (the reference's torch.topk leaves them open); the reference's filler slots (copies of
  the last key when a block has too few candidates) are not attended twice.
- Sliding-window layers: candidates are the keys some query of the block can see.
- Scores use queries and keys averaged over heads, one selection for all heads (as the reference);
  the reference's scripts share boundaries across layers (`--dhsa_share_boundaries`), we recompute
  them per layer.
- Execution: the global blocks, the diagonal block and dense-tail blocks run in the block kernel;
  the selected tokens run in the token-gather kernel; the two parts merge exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attnsieve.kernels import BlockSupport
from attnsieve.methods._lagged_blocks import real_query_rows
from attnsieve.methods.base import SparseMethod
from attnsieve.methods.registry import register
from attnsieve.methods.selection import block_layout, forced_blocks, grid_queries


@dataclass
class DHSAParams:
    token_budget: int = field(
        default=1024, metadata={"help": "key tokens per query block, global and local included (>= 1)"}
    )
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides token_budget when set"}
    )
    block_size: int = field(default=64, metadata={"help": "query block and key block of the kernel (16..512)"})
    boundary_window: int = field(
        default=4, metadata={"help": "keys each side of a candidate chunk boundary (1..block_size/2)"}
    )
    chunk_beta: int = field(
        default=8, metadata={"help": "at most (Tk // block_size) * chunk_beta chunk boundaries (>= 1; not causal)"}
    )
    nms_window: int = field(
        default=8, metadata={"help": "boundaries this close to a kept one are suppressed (>= 0; not causal)"}
    )
    global_tokens: int = field(default=128, metadata={"help": "first tokens every query block attends (>= 0)"})
    local_tokens: int = field(
        default=128, metadata={"help": "most recent keys up to a query block's end, always kept (>= 0; not causal)"}
    )
    instruction_tokens: int = field(
        default=64, metadata={"help": "last queries of a call that attend densely (>= 0, 0 disables)"}
    )
    length_norm: bool = field(default=True, metadata={"help": "scale chunk and query means by sqrt(length)"})
    causal: bool = field(
        default=False,
        metadata={"help": "False (paper): own queries, chunks ranked over all keys; True: previous block's, per-block"},
    )

    def __post_init__(self):
        if self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {self.token_budget}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if not 1 <= self.boundary_window <= self.block_size // 2:
            raise ValueError(f"boundary_window must be in [1, {self.block_size // 2}], got {self.boundary_window}")
        if self.chunk_beta < 1:
            raise ValueError(f"chunk_beta must be >= 1 chunk per key block, got {self.chunk_beta}")
        if self.nms_window < 0:
            raise ValueError(f"nms_window must be >= 0 tokens, got {self.nms_window}")
        if self.global_tokens < 0:
            raise ValueError(f"global_tokens must be >= 0, got {self.global_tokens}")
        if self.local_tokens < 0:
            raise ValueError(f"local_tokens must be >= 0, got {self.local_tokens}")
        if self.instruction_tokens < 0:
            raise ValueError(f"instruction_tokens must be >= 0, got {self.instruction_tokens}")


def split_budget(budget: int, bs: int, global_tokens: int) -> tuple[int, int]:
    """(global blocks, selected tokens) of a per-block token budget; the own block comes first."""
    if global_tokens == 0:
        return 0, max(0, budget - bs)
    n_global = min(-(-global_tokens // bs), max(1, (budget - bs) // bs))
    return n_global, max(0, budget - bs * (1 + n_global))


def _prefix(x: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums along dim 1: out[:, t] = x[:, :t].sum(1)."""
    out = x.new_zeros(x.shape[0], x.shape[1] + 1, *x.shape[2:])
    torch.cumsum(x, 1, out=out[:, 1:])
    return out


def _masked(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, C] with padding rows zeroed (x itself when there is no padding)."""
    return x if valid is None else x * valid.to(x.device, x.dtype)[..., None]


def gap_scores(k: torch.Tensor, key_valid: torch.Tensor | None, w: int) -> torch.Tensor:
    """[B, Tk + 1] score of every gap c (a chunk would start at c), -inf where it has no score.

    Gap c scores 1 - cos(mean k[c - w : c], mean k[c : c + w]) over real keys, heads concatenated;
    gaps without w keys on either side, or without a real key in a window, have no score.
    """
    B, Hkv, Tk, D = k.shape
    dev = k.device
    valid = torch.ones(B, Tk, device=dev) if key_valid is None else key_valid.to(dev, torch.float32)
    x = _masked(k.float().permute(0, 2, 1, 3).reshape(B, Tk, Hkv * D), key_valid)  # [B, Tk, Hkv*D]
    P, C = _prefix(x), _prefix(valid)  # [B, Tk + 1, Hkv*D], [B, Tk + 1]
    score = torch.full((B, Tk + 1), float("-inf"), device=dev)
    if Tk >= 2 * w:  # gaps c = w .. Tk - w have full windows
        mid = slice(w, Tk - w + 1)
        left = P[:, mid] - P[:, : Tk - 2 * w + 1]
        right = P[:, 2 * w :] - P[:, mid]
        n_left, n_right = C[:, mid] - C[:, : Tk - 2 * w + 1], C[:, 2 * w :] - C[:, mid]
        cos = F.cosine_similarity(left, right, dim=-1, eps=1e-6)  # means or sums: same cosine
        score[:, mid] = torch.where((n_left > 0) & (n_right > 0), 1 - cos, float("-inf"))
    return score


def chunk_boundaries(k: torch.Tensor, key_valid: torch.Tensor | None, bs: int, w: int) -> torch.Tensor:
    """[B, NK] start of the chunk that begins inside each key block (one boundary per block; causal=True).

    Block m's boundary is its highest-scoring gap c (`gap_scores`) in [m * bs + 1, (m + 1) * bs - w]
    (first on ties), so it uses only keys before (m + 1) * bs. A block with no candidate gap gets
    min((m + 1) * bs, Tk).
    """
    B, _, Tk, _ = k.shape
    n_k = -(-Tk // bs)
    dev = k.device
    score = F.pad(gap_scores(k, key_valid, w), (0, n_k * bs - Tk), value=float("-inf"))  # [B, n_k * bs + 1]
    cand = score[:, 1:].view(B, n_k, bs)[..., : bs - w]  # gaps m * bs + 1 .. (m + 1) * bs - w
    best = cand.argmax(-1)  # first maximum
    m = torch.arange(n_k, device=dev)
    bnd = m * bs + 1 + best
    fallback = torch.clamp((m + 1) * bs, max=Tk)
    return torch.where(torch.isfinite(cand.amax(-1)), bnd, fallback)


def _suppress(gaps: list[int], Tk: int, nms: int, max_boundaries: int, ins: int | None) -> list[int]:
    """Greedy 1-D non-maximum suppression over gaps in score order: the chunk ends, ascending, then Tk.

    `ins` (the instruction boundary) is kept first and no gap after it is considered.
    """
    taken: list[int] = []
    blocked = bytearray(Tk + 2 * nms + 2)  # blocked[c + nms]: gap c lies within nms of a kept one

    def keep(c: int) -> None:
        taken.append(c)
        lo, hi = max(0, c), max(0, c + 2 * nms + 1)
        if hi > lo:
            blocked[lo:hi] = b"\x01" * (hi - lo)

    if ins is not None:
        keep(ins)
    for c in gaps:
        if (ins is not None and c > ins) or blocked[c + nms]:
            continue
        keep(c)
        if len(taken) >= max_boundaries:  # checked after a gap is kept, as the reference does
            break
    return sorted({c for c in taken if 0 < c < Tk}) + [Tk]


def ranked_boundaries(
    k: torch.Tensor, key_valid: torch.Tensor | None, w: int, max_boundaries: int, nms: int, instruction: int
) -> torch.Tensor:
    """[B, NC] chunk ends of the paper form, ascending, the last Tk (rows padded with Tk).

    As the reference's `_select_boundary_candidates`: the gaps of the whole sequence in score order
    (best first, the earlier gap on ties), each kept unless within `nms` tokens of one kept before,
    until `max_boundaries` are kept; with `instruction` > 0 the gap Tk - instruction + 1 is kept
    first and later gaps are never considered. Chunk i spans [end[i - 1], end[i]) (end[-1] = 0).
    """
    B, _, Tk, _ = k.shape
    score = gap_scores(k, key_valid, w).cpu()
    ins = Tk - instruction + 1
    rows = []
    for b in range(B):
        order = torch.argsort(score[b], descending=True, stable=True)
        gaps = order[: int(torch.isfinite(score[b]).sum())].tolist()  # scored gaps, best first
        rows.append(_suppress(gaps, Tk, nms, max_boundaries, ins if instruction > 0 else None))
    n = max(len(r) for r in rows)
    out = torch.full((B, n), Tk, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r)
    return out.to(k.device)


def pooled_lagged_queries(q: torch.Tensor, Tk: int, bs: int, key_valid: torch.Tensor | None, length_norm: bool):
    """[B, NQ, D] query representative of each block: block j - 1's real queries pooled over heads
    and rows (mean, times sqrt(rows) with length_norm), or block j's own first real query when block
    j - 1 holds none (see `_lagged.py`)."""
    qm = q.float().mean(1, keepdim=True)  # [B, 1, Tq, D] queries averaged over heads
    qg, _ = grid_queries(qm, Tk, bs)  # [B, 1, NQ, bs, D]
    qg = qg[:, 0]
    real = real_query_rows(q.shape[2], Tk, bs, key_valid, q.shape[0], q.device)  # [B, NQ, bs]
    n = real.sum(-1).float()  # [B, NQ]
    mean = (qg * real[..., None]).sum(2) / n.clamp_min(1)[..., None]  # [B, NQ, D]
    rep = mean * n.sqrt()[..., None] if length_norm else mean
    prev, prev_n = F.pad(rep[:, :-1], (0, 0, 1, 0)), F.pad(n[:, :-1], (1, 0))
    own = torch.gather(qg, 2, real.to(torch.int8).argmax(-1)[..., None, None].expand(-1, -1, 1, qg.shape[-1]))[:, :, 0]
    return torch.where(prev_n[..., None] > 0, prev, own)


def _span_summaries(P, C, s, e, length_norm):
    """Key summaries of token ranges [s, e) ([B, X] each): ([B, X, D] means of their real keys,
    times sqrt(count) with length_norm; [B, X] counts), from prefix sums P [B, Tk + 1, D] of the
    masked keys and C [B, Tk + 1] of the real-key indicator."""
    Tk, D = P.shape[1] - 1, P.shape[2]
    idx_s, idx_e = s.clamp(0, Tk), e.clamp(0, Tk)
    tot = torch.gather(P, 1, idx_e[..., None].expand(-1, -1, D))
    tot = tot - torch.gather(P, 1, idx_s[..., None].expand(-1, -1, D))
    n = (torch.gather(C, 1, idx_e) - torch.gather(C, 1, idx_s)).clamp_min(0)
    rep = tot / n.clamp_min(1)[..., None]
    return (rep * n.sqrt()[..., None] if length_norm else rep), n


def pooled_own_queries(q: torch.Tensor, Tk: int, bs: int, key_valid: torch.Tensor | None, length_norm: bool):
    """[B, NQ, D] query representative of each block, the paper's: its own real queries pooled over
    heads and rows (mean, times sqrt(rows) with length_norm; zero for a block without a real query)."""
    qm = q.float().mean(1, keepdim=True)  # [B, 1, Tq, D] queries averaged over heads
    qg, _ = grid_queries(qm, Tk, bs)  # [B, 1, NQ, bs, D]
    real = real_query_rows(q.shape[2], Tk, bs, key_valid, q.shape[0], q.device)  # [B, NQ, bs]
    n = real.sum(-1).float()  # [B, NQ]
    mean = (qg[:, 0] * real[..., None]).sum(2) / n.clamp_min(1)[..., None]  # [B, NQ, D]
    return mean * n.sqrt()[..., None] if length_norm else mean


def paper_chunk_scores(q, k, ctx, bs, ends, length_norm):
    """Every chunk of the whole key sequence scored by every query block's own pooled queries.

    ends [B, NC] are the chunk ends (`ranked_boundaries`). Returns (scores [B, NQ, NC],
    span_start, span_end [B, NQ, NC]); chunks without a real key score -inf.
    """
    B, _, Tq, D = q.shape
    Tk = k.shape[2]
    dev = q.device
    valid = torch.ones(B, Tk, device=dev) if ctx.key_valid is None else ctx.key_valid.to(dev, torch.float32)
    km = _masked(k[:, 0].float() if k.shape[1] == 1 else k.float().mean(1), ctx.key_valid)  # keys over heads
    start = F.pad(ends[:, :-1], (1, 0))  # [B, NC]
    chunk, n = _span_summaries(_prefix(km), _prefix(valid), start, ends, length_norm)
    qrep = pooled_own_queries(q, Tk, bs, ctx.key_valid, length_norm)  # [B, NQ, D]
    scores = (qrep @ chunk.transpose(1, 2)).masked_fill((n == 0)[:, None, :], float("-inf"))  # [B, NQ, NC]
    n_q = scores.shape[1]
    return scores, start[:, None, :].expand(B, n_q, -1), ends[:, None, :].expand(B, n_q, -1)


def chunk_scores(q, k, ctx, bs, bnd, length_norm):
    """Chunk-level similarity of every query block with every chunk it may rank.

    Returns (scores [B, NQ, NK], span_start [B, NQ, NK], span_end [B, NQ, NK]): chunk m spans
    [bnd[m - 1], bnd[m]) (bnd[-1] = 0); for query block g chunk g is cut at g * bs (its known part)
    and chunks after g are not candidates (score -inf, empty span).
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dev = q.device
    n_k = bnd.shape[1]
    first = (Tk - Tq) // bs
    n_q = n_k - first
    valid = torch.ones(B, Tk, device=dev) if ctx.key_valid is None else ctx.key_valid.to(dev, torch.float32)
    km = _masked(k[:, 0].float() if k.shape[1] == 1 else k.float().mean(1), ctx.key_valid)  # keys over heads
    P, C = _prefix(km), _prefix(valid)  # [B, Tk + 1, D], [B, Tk + 1]

    start = F.pad(bnd[:, :-1], (1, 0))  # [B, NK]
    chunk, n_chunk = _span_summaries(P, C, start, bnd, length_norm)
    g = torch.arange(first, first + n_q, device=dev)  # [NQ] grid index of each query block
    tail_s = start[:, g.clamp_max(n_k - 1)]  # [B, NQ] start of the chunk cut at g * bs
    tail, n_tail = _span_summaries(P, C, tail_s, (g * bs).expand(B, -1), length_norm)

    qrep = pooled_lagged_queries(q, Tk, bs, ctx.key_valid, length_norm)  # [B, NQ, D]

    scores = qrep @ chunk.transpose(1, 2)  # [B, NQ, NK]
    tail_score = (qrep * tail).sum(-1)  # [B, NQ]
    m = torch.arange(n_k, device=dev)[None, None, :]
    gg = g[None, :, None]
    scores = torch.where(m == gg, tail_score[..., None], scores)
    span_s = start[:, None, :].expand(B, n_q, n_k)
    span_e = torch.where(m == gg, (gg * bs).expand(B, -1, n_k), bnd[:, None, :].expand(B, n_q, n_k))
    n = torch.where(m == gg, n_tail[..., None], n_chunk[:, None, :].expand(B, n_q, n_k))
    live = (m <= gg) & (n > 0)
    scores = scores.masked_fill(~live, float("-inf"))
    span_e = torch.where(live, span_e, span_s)
    return scores, span_s, span_e


def select_tokens(scores, span_s, span_e, lo, hi, n_sel):
    """Top tokens of each query block by upsampled chunk score: [B, NQ, M] positions, -1 unused.

    A token scores its chunk's score; candidates are tokens in [lo, hi) (per block, [B, NQ]);
    each block keeps its n_sel ([B, NQ]) best, whole chunks in score order (stable: earlier chunk,
    then earlier token, on ties), which equals a top-k over the token-level score matrix without
    building it.
    """
    cs = torch.maximum(span_s, lo[..., None])
    ce = torch.minimum(span_e, hi[..., None])
    length = (ce - cs).clamp_min(0)
    length = torch.where(torch.isfinite(scores), length, 0)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    length = torch.gather(length, -1, order)
    cs = torch.gather(cs, -1, order)
    cum = length.cumsum(-1)  # [B, NQ, NK]
    n_sel = torch.minimum(n_sel, cum[..., -1])
    M = int(n_sel.max()) if n_sel.numel() else 0
    slot = torch.arange(M, device=scores.device).expand(*scores.shape[:2], M).contiguous()
    rank = torch.searchsorted(cum, slot, right=True).clamp_max(scores.shape[-1] - 1)
    before = torch.gather(cum - length, -1, rank)
    pos = torch.gather(cs, -1, rank) + slot - before
    return torch.where(slot < n_sel[..., None], pos, -1)


@register(
    "dhsa",
    family="sparse",
    phases=("prefill",),
    params=DHSAParams,
    summary="DHSA: variable-length key chunks, sqrt-length-normalised summaries, chunk scores upsampled to tokens.",
)
class DHSA(SparseMethod):
    selects_tokens = True  # support() adds single key tokens to its blocks
    exact_params = {"density": 1.0}  # every candidate token is kept: exact attention

    def _rows(self, Tq, Tk, key_valid, instruction_tokens, batch, device):
        """(real query rows [B, NQ, bs], dense-tail blocks [B, NQ]) of this call, on `device`."""
        bs = self.params.block_size
        rows = real_query_rows(Tq, Tk, bs, key_valid, batch, device)
        first = (Tk - Tq) // bs
        pos = (first * bs + torch.arange(rows.shape[1] * bs, device=device)).view(-1, bs)
        tail = (rows & (pos >= Tk - instruction_tokens)).any(-1)
        return rows, tail

    def _density(self, rows, tail, first, fr, sink_blk, budget) -> float:
        """Measured density `causal=True` is expected to reach with a token budget, from positions alone
        (host tensors, as `budget` makes them)."""
        bs = self.params.block_size
        n_global, n_sel = split_budget(budget, bs, self.params.global_tokens)
        g = torch.arange(first, first + rows.shape[1])[None, :, None]
        p = g * bs + torch.arange(bs)
        fr = fr[:, None, None]
        g_end = torch.maximum((sink_blk[:, None, None] + n_global) * bs, fr)
        exact = p - fr + 1
        own = p - torch.maximum(g * bs, fr) + 1
        glob = (torch.minimum(g_end, g * bs) - fr).clamp_min(0)
        cand = (g * bs - g_end).clamp_min(0)
        cells = torch.where(tail[..., None], exact, own + glob + cand.clamp_max(n_sel))
        return float((cells * rows).sum()) / max(1.0, float((exact * rows).sum()))

    def _density_paper(self, rows, tail, first, fr, Tk, budget) -> float:
        """Measured density the paper form is expected to reach with a token budget, from positions alone.

        Block g keeps the global blocks, its recent keys and the scored keys between them (their
        count, not their place, matters: every kept key before the block is seen by all its rows).
        Host tensors, as `budget` makes them.
        """
        p = self.params
        bs = p.block_size
        G = min(p.global_tokens, budget)
        g = torch.arange(first, first + rows.shape[1])[None, :, None]
        pos = g * bs + torch.arange(bs)
        fr = fr[:, None, None]
        end = torch.clamp((g + 1) * bs, max=Tk)
        own_start = torch.maximum(g * bs, fr)
        cover = -(-(fr + G) // bs) * bs if G else fr  # end of the global blocks
        glob = (torch.minimum(cover, g * bs) - fr).clamp_min(0)
        recent = (end - fr).clamp_min(0).clamp_max(min(p.local_tokens, budget - G))
        rec_start = torch.maximum(end - recent, fr)
        rec = (g * bs - rec_start).clamp_min(0)
        overlap = torch.minimum((fr + glob - rec_start).clamp_min(0), torch.minimum(glob, rec))
        scored = ((end - recent) - torch.maximum(cover, fr)).clamp_min(0).clamp_max(max(0, budget - G) - recent)
        before = torch.minimum((g * bs - fr).clamp_min(0), glob + rec - overlap + scored.clamp_min(0))
        exact = pos - fr + 1
        cells = torch.where(tail[..., None], exact, (pos - own_start + 1).clamp_min(0) + before)
        return float((cells * rows).sum()) / max(1.0, float((exact * rows).sum()))

    def budget(self, q, Tk, key_valid, layout) -> tuple[int, int]:
        """(token budget per query block, instruction tokens) for this call.

        With `density`, the budget whose expected measured density is nearest the target; the dense
        instruction tail is kept only when the target leaves room for it.
        """
        p = self.params
        top = Tk + p.block_size * (2 + -(-p.global_tokens // p.block_size))  # keeps every candidate
        if p.density is None:
            return p.token_budget, p.instruction_tokens
        if p.density >= 1:
            return top, p.instruction_tokens
        # The search runs on the host: its inputs are positions and padding alone, so one copy of the
        # padding mask (none without padding) replaces two reads per step.
        B = q.shape[0]
        kv = None if key_valid is None else key_valid.cpu()
        fr = torch.zeros(B, dtype=torch.long) if kv is None else kv.to(torch.int8).argmax(-1)
        sink_blk = fr // p.block_size  # layout.sink: the first key block holding a real key
        rows, tail = self._rows(q.shape[2], Tk, kv, p.instruction_tokens, B, None)

        def density(b):
            if p.causal:
                return self._density(rows, tail, layout.first_qb, fr, sink_blk, b)
            return self._density_paper(rows, tail, layout.first_qb, fr, Tk, b)

        instruction = p.instruction_tokens
        if instruction and density(1) > p.density:
            instruction = 0
            tail = torch.zeros_like(tail)
        lo, hi = 1, top
        while lo < hi:  # largest budget whose expected density stays within the target
            mid = (lo + hi + 1) // 2
            if density(mid) <= p.density:
                lo = mid
            else:
                hi = mid - 1
        nxt = min(lo + 1, top)
        return (lo if abs(density(lo) - p.density) <= abs(density(nxt) - p.density) else nxt), instruction

    def plan(self, q, k, ctx) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(blocks [B, NQ, NK] every head attends, tokens [B, NQ, M] shared by all heads, or None)."""
        return self._plan_causal(q, k, ctx) if self.params.causal else self._plan_paper(q, k, ctx)

    def _plan_paper(self, q, k, ctx):
        """The reference's selection (module docstring, "Estimation"): the global tokens, the recent
        keys, and the best-scoring keys between them up to the budget."""
        p = self.params
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        bs = p.block_size
        dev = q.device
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, dev)
        n_q, first = layout.n_q, layout.first_qb
        budget, instruction = self.budget(q, Tk, ctx.key_valid, layout)
        rows, tail = self._rows(Tq, Tk, ctx.key_valid, instruction, B, dev)
        has_rows = rows.any(-1)  # [B, NQ]
        G = min(p.global_tokens, budget)

        # Candidates of block g: real keys (inside the window) up to the block's end.
        fr = torch.zeros(B, 1, dtype=torch.long, device=dev)
        if ctx.key_valid is not None:
            fr = ctx.key_valid.to(dev, torch.int8).argmax(-1)[:, None]  # [B, 1] first real key
        g = torch.arange(first, first + n_q, device=dev)[None, :]  # [1, NQ]
        end = torch.clamp((g + 1) * bs, max=Tk).expand(B, n_q)
        lo = fr.expand(B, n_q)
        if ctx.window is not None:
            lo = torch.maximum(lo, torch.clamp(g * bs, min=Tk - Tq) - ctx.window + 1)
        n_cand = (end - lo).clamp_min(0)
        full = tail | ~has_rows | (n_cand <= budget)  # blocks that keep every candidate (or have no query)

        kb = torch.arange(layout.n_k, device=dev)[None, None, :]
        cover = -(-(fr + G) // bs) * bs if G else fr  # [B, 1] the global blocks end here
        glob = (kb * bs < cover[..., None]) & ((kb + 1) * bs > fr[..., None]) & (G > 0)  # blocks of the first G keys
        blocks = (glob & layout.allowed) | forced_blocks(layout, 0, 1) | (layout.allowed & full[..., None])
        blocks = blocks & has_rows[..., None]
        recent = n_cand.clamp_max(min(p.local_tokens, budget - G))  # [B, NQ] most recent keys, always kept
        # One read for both: whether every block keeps all its candidates, and the longest recent list.
        all_full, n_recent = torch.stack([full.all(), recent.max()]).tolist()
        if all_full:
            return blocks, None
        hi = end - recent
        s_lo = torch.maximum(lo, cover)  # scored keys lie between the global blocks and the recent keys
        n_scored = torch.minimum((hi - s_lo).clamp_min(0), budget - G - recent)
        ends = ranked_boundaries(
            k, ctx.key_valid, p.boundary_window, (Tk // bs) * p.chunk_beta, p.nms_window, instruction
        )
        scores, span_s, span_e = paper_chunk_scores(q, k, ctx, bs, ends, p.length_norm)
        chosen = select_tokens(scores, span_s, span_e, s_lo, hi, torch.where(full, 0, n_scored))  # [B, NQ, M]
        slot = torch.arange(n_recent, device=dev)
        rec = torch.where(slot < recent[..., None], hi[..., None] + slot, -1)  # [B, NQ, R]
        tokens = torch.cat([chosen, rec], -1)
        return blocks, torch.where(full[..., None], -1, tokens)

    def _plan_causal(self, q, k, ctx):
        """The leak-free selection (module docstring, `causal=True`)."""
        p = self.params
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        bs = p.block_size
        dev = q.device
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, dev)
        n_q, first = layout.n_q, layout.first_qb
        budget, instruction = self.budget(q, Tk, ctx.key_valid, layout)
        n_global, n_sel = split_budget(budget, bs, p.global_tokens)
        rows, tail = self._rows(Tq, Tk, ctx.key_valid, instruction, B, dev)
        has_rows = rows.any(-1)  # [B, NQ]

        # Candidates of block g: keys after the global blocks (and inside the window) before g * bs.
        g = torch.arange(first, first + n_q, device=dev)[None, :]
        lo = ((layout.sink[:, None] + n_global) * bs).expand(B, n_q)
        if ctx.key_valid is not None:  # never spend the budget on left padding
            lo = torch.maximum(lo, ctx.key_valid.to(dev, torch.int8).argmax(-1)[:, None])
        if ctx.window is not None:
            lo = torch.maximum(lo, torch.clamp(g * bs, min=Tk - Tq) - ctx.window + 1)
        hi = torch.maximum(g * bs, lo)
        full = tail | ~has_rows | (hi - lo <= n_sel)  # blocks that keep every candidate (or have no query)
        blocks = (forced_blocks(layout, n_global, 1) | (layout.allowed & full[..., None])) & has_rows[..., None]
        if bool(full.all()):
            return blocks, None
        bnd = chunk_boundaries(k, ctx.key_valid, bs, p.boundary_window)
        scores, span_s, span_e = chunk_scores(q, k, ctx, bs, bnd, p.length_norm)
        want = torch.where(full, 0, torch.full_like(hi, n_sel))
        return blocks, select_tokens(scores, span_s, span_e, lo, hi, want)

    def support(self, q, k, ctx):
        blocks, tokens = self.plan(q, k, ctx)
        B, Hkv = k.shape[:2]
        support = BlockSupport.from_mask(blocks[:, None].expand(B, Hkv, *blocks.shape[1:]), self.params.block_size)
        if tokens is None or tokens.shape[-1] == 0:
            return support
        return dataclasses.replace(support, tokens=tokens[:, None].expand(B, Hkv, *tokens.shape[1:]))

"""TokenSelect: token-level key selection by a soft vote of the heads, plus sinks and a local window.

Prefill runs in chunks of queries; for each chunk every head scores the key tokens cached so far by
the dot product with the chunk's mean query, turns its scores into a softmax, and the heads'
softmaxes are summed (the "head soft vote", so no single head with large logits dominates); the
top-k tokens of the vote, the first `n_init` tokens and the `n_local` most recent ones are attended
exactly. Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs
via Dynamic Token-Level KV Cache Selection", EMNLP 2025 (arXiv:2411.02886), Eq. 7 and Section 5.2
(chunk-wise selection in prefill). Reference: pzs19/TokenSelect, patcher/token_retrieval.py
(`patched_radix_attention_extend_forward_flashinfer`, `TokenRetriever.retrieval_indices`,
`TokenRetriever.get_topk_tokens`), budgets from config/{llama,qwen}-token-retrieval.yaml.

Hyperparameters (defaults are the reference's, unscaled by length):
- `top_k`: selected tokens per query chunk (2048, at every context length).
- `n_init`: first real tokens always attended (128).
- `n_local`: most recent real tokens before the chunk's end always attended (512).
- `block_size`: the query chunk sharing one selection (None: 512, the reference's
  PREFILL_CHUNK_SIZE; 64 with `causal=True` or `density`, see below). With `causal=True` it is
  also the block of the local window.
- `causal`: False (the paper, default): a chunk is scored with the mean of its own queries;
  True: with the previous chunk's (leak-free, below).
- `density`: when set, overrides the three budgets so the measured density lands near it: the
  per-query token budget b of a window of the same density is split in the paper's ratio
  n_init : n_local : top_k = 128 : 512 : 2048, and top_k is then set so the predicted density
  (computed in closed form on an unpadded input) is nearest the target. Chunks are then 64 tokens
  (unless `block_size` is given): a 512-token chunk attends its own block whole, which alone is
  1/8 of the causal cells at 4k. Density 1 keeps every block (dense).

Estimation (default, `causal=False`, as the reference's chunked prefill): chunk j's keys are cached
before its retrieval, so it chooses from the real keys up to its end (the reference's
`current_num_tokens`): the first n_init, the last n_local, and the top_k of the tokens between them
by the head soft vote of the mean of the chunk's own queries, summed over every head of the layer
(one token list for all heads, as the reference's sum over heads and tensor-parallel ranks). When
the budgets cover every cached token (n_init + top_k + n_local >= tokens so far) the chunk attends
all of them, as the reference does. The token-level causal mask applies, so a query never attends a
later key, but a later query of a chunk changes the tokens an earlier one sees: outputs are not
prefix-consistent. When prefill is chunked by the caller (Tq < Tk) the chunks are the query blocks
of the absolute block grid and each is scored with the mean of its queries present in the call
(the reference cuts chunks from the call's first query).

`causal=True` (leak-free, for prefix caching and teacher-forced perplexity): chunk j is scored with
the mean of chunk j - 1's real queries (lagged by one chunk), per KV group, and its candidates lie
before its local window of ceil(n_local / block_size) whole blocks (the diagonal included), so
nothing a query sees depends on a later token; the first chunk has no selection (its sink and local
blocks only). Chunks are 64 tokens so the lagged representative stays close to the queries it
serves; scoring is one row per chunk against the earlier keys, done in bounded row chunks. The
price: at the end of a prompt only the question's own queries look for the needle, and the lagged
selection cannot use them; on a 4k pass-key prompt with Gemma 3 270M the lagged selection did not
find the key even at density 0.5.

Execution: the local blocks (and, with the default, rows the budgets cover whole) run on the
block-sparse kernel and the sink, selected and partial-block local tokens on the token-gather
kernel (tokens inside a kept block dropped by `drop_covered`), merged through their log-sum-exp;
cells = block cells + token cells. Selection time is reported as estimate_s.

Deviations:
- The local window always covers the chunk's own block: the reference's n_local (512) equals its
  chunk, so its window is exactly the chunk; a smaller n_local (under `density`, or set by hand)
  would otherwise leave a chunk's first queries without their own keys.
- GQA: the reference's Triton scoring kernel pairs query head h with KV head h % Hkv; here head h
  scores the keys of KV head h // (H / Hkv), the grouping the attention itself uses. With
  `causal=True` the vote is per KV group (each KV head gathers its own tokens); with one KV head
  (Gemma 3) both votes coincide.
- Scores use the post-RoPE keys the layer attends; the reference scores its pre-RoPE key cache
  against queries rotated to a fixed position (part of its length extrapolation). As in the
  paper and the reference, the per-head softmax is over raw dot products (no 1/sqrt(d) scale);
  the vote is summed in the log domain in float32 (the reference: bfloat16), so tokens far below a
  head's maximum do not underflow to ties.
- Sliding-window layers (which the reference refuses): candidates lie inside the window of the
  chunk's first query; the kernels apply the window per query.
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
    exact_cells,
)
from attnsieve.methods._lagged_blocks import own_block_queries
from attnsieve.methods._static import pair_cells
from attnsieve.methods.base import SparseMethod
from attnsieve.methods.registry import register
from attnsieve.methods.selection import block_layout, forced_blocks, grid_queries
from attnsieve.methods.window import first_real_positions, window_for_density

PAPER_TOP_K, PAPER_N_INIT, PAPER_N_LOCAL, PAPER_CHUNK = 2048, 128, 512, 512
SHORT_CHUNK = 64  # chunk of the leak-free form and of the density knob (see the docstring)
# Largest number of score elements one selection step may hold (~64 MB fp32).
SCORE_CHUNK_ELEMS = 1 << 24


@dataclass
class TokenSelectParams:
    top_k: int = field(default=PAPER_TOP_K, metadata={"help": "selected tokens per query chunk (>= 0)"})
    n_init: int = field(default=PAPER_N_INIT, metadata={"help": "first real tokens always attended (>= 0)"})
    n_local: int = field(
        default=PAPER_N_LOCAL, metadata={"help": "most recent tokens always attended (>= 1; causal: as whole blocks)"}
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "query chunk sharing one selection (16..512; None: 512, or 64 with causal or density)"},
    )
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides top_k, n_init, n_local"}
    )
    causal: bool = field(
        default=False,
        metadata={"help": "False (paper): score a chunk with its own queries' mean; True: the previous chunk's"},
    )

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.n_init < 0:
            raise ValueError(f"n_init must be >= 0, got {self.n_init}")
        if self.n_local < 1:
            raise ValueError(f"n_local must be >= 1, got {self.n_local}")
        if self.block_size is not None and not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512] or None, got {self.block_size}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")

    def chunk(self) -> int:
        if self.block_size is not None:
            return self.block_size
        return SHORT_CHUNK if self.causal or self.density is not None else PAPER_CHUNK


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
    out = torch.full((B, Hkv, n_q, min(top_k, Tk)), -1, dtype=torch.long, device=q.device)
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
        span = min(max((first + e - local_blocks) * bs, 0), Tk)  # end[e - 1]: keys [0, span) hold every candidate
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


def paper_windows(key_valid, batch: int, Tq: int, Tk: int, bs: int, n_local: int, device):
    """([B, NQ] first position of each chunk's local window, [B, NQ] real keys before that position).

    The window holds the last n_local real keys before the chunk's end, and at least the chunk's
    own block (positions from the block's start on).
    """
    first, n_q, _ = block_grid(Tq, Tk, bs)
    valid = torch.ones(batch, Tk, dtype=torch.bool, device=device) if key_valid is None else key_valid.bool()
    csum = valid.long().cumsum(-1)  # [B, Tk] real keys up to each position
    g = torch.arange(first, first + n_q, device=device)
    cached = csum[:, ((g + 1) * bs).clamp_max(Tk) - 1]  # [B, NQ] the reference's current_num_tokens
    opener = (cached - n_local).clamp_min(0)  # rank of the window's first real key
    start = torch.searchsorted(csum, (opener + 1).contiguous())  # where the real key of that rank sits
    start = torch.minimum(start, g * bs)
    before = torch.where(start > 0, csum.gather(1, (start - 1).clamp_min(0)), torch.zeros_like(start))
    return start, before


def select_tokens_paper(q, k, ctx, bs: int, n_init: int, local_start: torch.Tensor, top_k: int, skip=None):
    """[B, NQ, top_k] key positions chosen by the soft vote of every head per query chunk (-1: unused).

    Chunk j is scored with the mean of its own real queries; candidates are the real keys before
    its local window (`local_start`, [B, NQ]) that are not among the first n_init real tokens, inside
    the layer's window of the chunk's first query. Rows where `skip` ([B, NQ]) holds are not scored.
    """
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    first = (Tk - Tq) // bs
    rep = own_block_queries(q, Tk, bs, ctx.key_valid)  # [B, H, NQ, D]
    n_q = rep.shape[2]
    width = min(top_k, Tk)
    out = torch.full((B, n_q, width), -1, dtype=torch.long, device=q.device)
    if width == 0:
        return out
    pos = torch.arange(Tk, device=q.device)
    valid = torch.ones(B, Tk, dtype=torch.bool, device=q.device) if ctx.key_valid is None else ctx.key_valid.bool()
    keyable = valid & (valid.long().cumsum(-1) - 1 >= n_init)  # [B, Tk]
    g = torch.arange(first, first + n_q, device=q.device)
    step = max(1, min(SCORE_CHUNK_ELEMS // max(1, B * H * Tk), -(-n_q // 8)))
    # Keys [0, span) hold every candidate of a row chunk (0: every row skipped); all chunks' spans in one host read.
    n_c = -(-n_q // step)
    spans = torch.nn.functional.pad(local_start, (0, n_c * step - n_q)).view(B, n_c, step).amax((0, 2))  # [n_c]
    if skip is not None:
        skipped = torch.nn.functional.pad(skip, (0, n_c * step - n_q), value=True).view(B, n_c, step).all(-1).all(0)
        spans = spans.masked_fill(skipped, 0)
    for s, span in zip(range(0, n_q, step), spans.tolist(), strict=True):
        e = min(s + step, n_q)
        if span == 0:
            continue
        kpos = pos[:span]
        cand = keyable[:, None, :span] & (kpos[None, None, :] < local_start[:, s:e, None])  # [B, n, span]
        if ctx.window is not None:
            first_q = (g[s:e] * bs).clamp_min(Tk - Tq)
            cand &= kpos[None, None, :] > (first_q - ctx.window)[None, :, None]
        vote = torch.logsumexp(soft_vote(rep[:, :, s:e], k[:, :, :span], cand), dim=1)  # [B, n, span] all heads
        vals, idx = vote.topk(min(width, span), dim=-1)
        out[:, s:e, : idx.shape[-1]] = torch.where(vals > float("-inf"), idx, -1)
    return out


def paper_density_budgets(density: float, Tq: int, Tk: int, bs: int) -> tuple[int, int, int]:
    """(n_local, n_init, top_k) of the paper form whose predicted density (unpadded) is nearest `density`."""
    budget = window_for_density(density, Tq, Tk, 0)  # tokens per query of a window this dense
    paper = PAPER_N_INIT + PAPER_N_LOCAL + PAPER_TOP_K
    n_init = round(budget * PAPER_N_INIT / paper)
    n_local = max(1, round(budget * PAPER_N_LOCAL / paper))
    first, n_q, _ = block_grid(Tq, Tk, bs)
    g = torch.arange(first, first + n_q, dtype=torch.long)
    s, e = (g * bs).clamp_min(Tk - Tq), ((g + 1) * bs).clamp_max(Tk)  # the chunk's query positions [s, e)
    rows = e - s
    start = torch.minimum((e - n_local).clamp_min(0), g * bs)  # the local window, as paper_windows
    local = rows * (s - start + 1) + rows * (rows - 1) // 2  # sum over p in [s, e) of p - start + 1
    fixed = int(local.sum() + (rows * start.clamp_max(n_init)).sum())
    cand = (start - n_init).clamp_min(0)  # all before the chunk's first query: visible to every row
    total = max(1, exact_cells(Tq, Tk))

    def predicted(top_k: int) -> float:
        return (fixed + int((rows * cand.clamp_max(top_k)).sum())) / total

    lo, hi = 0, Tk  # largest top_k with predicted <= density, then the nearer of it and the next
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if predicted(mid) <= density else (lo, mid - 1)
    top_k = lo + 1 if abs(predicted(lo + 1) - density) < abs(predicted(lo) - density) else lo
    return n_local, n_init, top_k


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
        bs = p.chunk()
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, q.device)
        if p.density is not None and p.density >= 1:
            return BlockSupport.from_mask(layout.allowed[:, None].expand(B, Hkv, -1, -1), bs)
        if p.causal:
            tokens, blocks = self._lagged(q, k, ctx, bs, layout)
            tokens = drop_covered(tokens, blocks)
        else:
            tokens, blocks = self._paper(q, k, ctx, bs, layout)  # its lists and blocks are disjoint
        # valid positions first (descending), then trim the columns no list uses
        tokens = tokens.sort(dim=-1, descending=True).values
        tokens = tokens[..., : max(1, int((tokens >= 0).sum(-1).max()))]
        return dataclasses.replace(blocks, tokens=tokens)

    def _paper(self, q, k, ctx, bs, layout):
        """The reference's chunk selection: own-query mean, every head's vote, last n_local tokens."""
        p = self.params
        B, Hkv, Tk = q.shape[0], k.shape[1], k.shape[2]
        if p.density is not None:
            n_local, n_init, top_k = paper_density_budgets(p.density, q.shape[2], Tk, bs)
        else:
            n_local, n_init, top_k = p.n_local, p.n_init, p.top_k
        start, before = paper_windows(ctx.key_valid, B, q.shape[2], Tk, bs, n_local, q.device)  # [B, NQ]
        whole = (before - n_init).clamp_min(0) <= top_k  # [B, NQ] the budgets cover every cached token
        kb = torch.arange(layout.n_k, device=q.device)
        g = torch.arange(layout.first_qb, layout.first_qb + layout.n_q, device=q.device)
        local = (kb[None, None, :] * bs >= start[..., None]) & (kb[None, :] <= g[:, None])[None]  # [B, NQ, NK]
        mask = layout.allowed & (local | whole[..., None])
        # the window's first block when the window opens inside it: its tokens from the opening on
        part = (start // bs * bs)[..., None] + torch.arange(bs, device=q.device)  # [B, NQ, bs], all < g * bs
        valid = torch.ones(B, Tk, dtype=torch.bool, device=q.device) if ctx.key_valid is None else ctx.key_valid.bool()
        part_ok = (part >= start[..., None]) & (start % bs != 0)[..., None]
        part_ok &= torch.gather(valid, 1, part.clamp_max(Tk - 1).flatten(1)).view_as(part)
        part = torch.where(part_ok, part, -1)
        sinks = first_real_positions(ctx.key_valid, B, Tk, n_init, q.device)[:, None]  # [B, 1, n_init]
        sinks = torch.where(sinks < start[..., None], sinks, -1)  # later sinks lie in the local window
        chosen = select_tokens_paper(q, k, ctx, bs, n_init, start, top_k, skip=whole)  # [B, NQ, top_k]
        tokens = torch.cat([sinks, part, chosen], dim=-1)
        tokens = torch.where(whole[..., None], -1, tokens)  # those rows keep all their blocks
        tokens = tokens[:, None].expand(-1, Hkv, -1, -1).contiguous()  # one list shared by every head
        return tokens, BlockSupport.from_mask(mask[:, None].expand(B, Hkv, -1, -1), bs)

    def _lagged(self, q, k, ctx, bs, layout):
        """Leak-free: the previous chunk's mean per KV group, candidates before whole local blocks."""
        p = self.params
        B, Hkv, Tk = q.shape[0], k.shape[1], k.shape[2]
        if p.density is not None:
            local, n_init, top_k = density_budgets(p.density, q.shape[2], Tk, bs, ctx.window)
        else:
            local, n_init, top_k = math.ceil(p.n_local / bs), p.n_init, p.top_k
        local = min(local, layout.n_k)
        blocks = BlockSupport.from_mask(forced_blocks(layout, 0, local)[:, None].expand(B, Hkv, -1, -1), bs)
        tokens = select_tokens(q, k, ctx, bs, local, n_init, top_k)  # [B, Hkv, NQ, top_k]
        sinks = first_real_positions(ctx.key_valid, B, Tk, n_init, q.device)  # [B, n_init]
        tokens = torch.cat([sinks[:, None, None].expand(-1, Hkv, layout.n_q, -1), tokens], dim=-1)
        return tokens, blocks

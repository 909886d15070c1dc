"""LongHeads: each attention head attends its own few context chunks, chosen by query-chunk affinity.

The context is split into chunks; each chunk is summarised by one key (the attention-weighted mean
of its keys) and every query token of every head keeps the first chunk, the local chunks and the
chunks whose summary key scores highest against that query, so the attended length stays within the
model's trained length. Lu, Zhou, He, Zhao, Ji, Gui, Zhang, Huang, "LongHeads: Multi-Head Attention
is Secretly a Long Context Processor", Findings of EMNLP 2024 (arXiv:2402.10685); reference
implementation LuLuLuyi/LongHeads, modeling_longheads/modeling_llama.py `LlamaAttention.forward`.

Chunk representation (the reference's): inside each chunk the chunk's queries attend all of the
chunk's keys (bidirectionally); the mean of those outputs is a probe vector, and the chunk's summary
key is the softmax(probe . k)-weighted mean of the chunk's keys. `chunk_repr="mean"` uses the plain
key mean instead. Chunks with no query in this call (a KV cache prefix) use the mean.

Selection (default, `per_query=True`, the paper's per-token rule, as the reference's prefill does
it: `global_qk` scores every query token against every chunk key, chunk 0 and the query's own and
previous chunk are forced, chunks after the query's are masked, `topk(atten_chunk_num)` per token):
every query token of every head ranks the chunks with its own query and keeps max_len // chunk_size
of them. The block kernel computes, per query block, the union of its rows' chunks (measured density
counts all of it, so at a fixed `max_len` it exceeds what one query attends) and each row's softmax
covers only its own chunks (`BlockSupport.row_mask`), so a query's output depends only on its own
choice. That choice reads the query itself and the summaries
of chunks that end before its previous chunk starts (the nearer ones are forced), never a later
token: the paper's rule is causal as it stands, so this method has no look-ahead and no `causal`
parameter. When prefill is chunked (Tq < Tk) every query of the chunk still chooses for itself.

Hyperparameters:
- `chunk_size`: tokens per chunk (paper: 256), a multiple of `block_size`.
- `max_len`: tokens each query attends, first and local chunks included (paper: 4096, the trained
  length of Llama-2); n_chunks = max_len // chunk_size chunks per query. Queries whose whole causal
  context fits attend it all, as LongHeads encodes the first max_len tokens densely. Not scaled with
  length (the reference's `atten_length` is fixed).
- `density`: target measured density in (0, 1]; overrides the chunk count. With `per_query` each
  query block's per-query count is set by a controller from the union sizes measured on earlier
  query blocks only (the union a count gives is known only after the block's queries chose), so the
  measured density lands near the target without any output depending on a later token; with
  `per_query=False` one count for every query block is searched on the layout. When the three forced
  chunks alone would take more than half of the budget, the chunk size is halved (not below
  `block_size`) until they fit, so low densities stay reachable at short contexts.
- `chunk_repr`: "attn" (the paper's attention-weighted chunk key) or "mean".
- `block_size`: query block (and kernel block) size, 16..512.
- `per_query`: True (the paper, default): every query token chooses its own chunks; False: one
  choice per query block (below).

Deviations from the paper, and why:
- `per_query=False` (one choice per query block, cheaper: no union, no row masks): the chunks of a
  query block are chosen once, by the mean of the previous block's queries (the first block of a
  call falls back to its first query), among chunks that end before the previous chunk starts, so
  no query's choice depends on a later token. A question token does not steer its own block's
  chunks in this form.
- Forced chunks follow the reference code: the first chunk, the query's chunk and the one before it.
- The query attends its own key: the reference truncates the current chunk's keys to the positions
  before the query ((atten_chunk_num - 1) * chunk + offset keys), which leaves a query's own token
  out of its softmax (at a chunk's first token, the chunk entirely); here every query attends its
  chosen chunks under the exact causal mask, diagonal included.
- Positions: the paper re-encodes the selected chunks with contiguous positions (RoPE inside the
  trained length). The method receives post-RoPE keys, so selected keys keep their true positions,
  and query-chunk scores are post-RoPE dot products (the reference scores un-rotated queries against
  chunk-locally rotated summary keys). For a model used within its trained length, as here, the
  re-encoding is not needed.
- Chunk summaries average only real (non-padding) queries and keys; the forced first chunk is chunk 0
  of the grid, which holds no key to attend when left padding fills it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from attnsieve.kernels import BlockSupport, block_sparse_attention
from attnsieve.methods._lagged_blocks import lagged_block_queries, real_query_rows
from attnsieve.methods.base import AttnOutput, SparseMethod, estimate_clock
from attnsieve.methods.block_topk import key_block_summaries
from attnsieve.methods.registry import register
from attnsieve.methods.selection import block_layout, density_budget, grid_queries, topk_support

FORCED_CHUNKS = 3  # first chunk, previous chunk, current chunk
CHUNK_ELEMS = 1 << 24  # score elements per step when summarising chunks or ranking them per query


@dataclass
class LongHeadsParams:
    chunk_size: int = field(default=256, metadata={"help": "tokens per chunk, a multiple of block_size"})
    max_len: int = field(
        default=4096, metadata={"help": "tokens attended per query, forced chunks included (>= 3 chunks)"}
    )
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides the chunk count"}
    )
    chunk_repr: Literal["attn", "mean"] = field(
        default="attn", metadata={"help": "chunk summary key: attn (paper) or mean of the chunk's keys"}
    )
    block_size: int = field(default=64, metadata={"help": "query / kernel block size (16..512)"})
    per_query: bool = field(
        default=True,
        metadata={"help": "True (paper): each query token picks its own chunks, its block computes their union; "
                          "False: one pick per query block, by the previous block's mean query"},
    )

    def __post_init__(self):
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.chunk_size < self.block_size or self.chunk_size % self.block_size:
            raise ValueError(
                f"chunk_size must be a positive multiple of block_size={self.block_size}, got {self.chunk_size}"
            )
        if self.max_len < FORCED_CHUNKS * self.chunk_size:
            raise ValueError(
                f"max_len must be >= {FORCED_CHUNKS} chunks ({FORCED_CHUNKS * self.chunk_size} tokens), "
                f"got {self.max_len}"
            )
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.chunk_repr not in ("attn", "mean"):
            raise ValueError(f"chunk_repr must be 'attn' or 'mean', got {self.chunk_repr!r}")


def chunk_keys(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, key_valid: torch.Tensor | None, cs: int, scale: float,
    repr_: str,
) -> torch.Tensor:
    """Summary key of every chunk for every query head: [B, H, NC, D] float32.

    "attn": the chunk's real queries attend all its real keys; the mean output probes the chunk's
    keys, whose softmax-weighted mean is the summary. Chunks without a query here, and "mean",
    use the mean of the real keys. Chunks of pure padding get zeros (they are never candidates).
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    n_c = -(-Tk // cs)
    _, _, kmean = key_block_summaries(k, key_valid, cs, n_c)  # [B, Hkv, NC, D]
    summary = kmean[:, :, None].expand(B, Hkv, G, n_c, D).reshape(B, H, n_c, D).clone()
    if repr_ == "mean":
        return summary
    pad = n_c * cs - Tk
    valid = torch.ones(B, Tk, dtype=torch.bool, device=k.device) if key_valid is None else key_valid.to(torch.bool)
    valid = torch.nn.functional.pad(valid, (0, pad)).view(B, n_c, cs)
    q_ok = valid.clone().view(B, -1)
    q_ok[:, : Tk - Tq] = False  # positions before this call's queries have no query here
    q_ok = q_ok.view(B, n_c, cs)
    qf = q.new_zeros(B, H, n_c * cs, D, dtype=torch.float32)
    qf[:, :, Tk - Tq : Tk] = q.float()
    qf = qf.view(B, Hkv, G, n_c, cs, D)
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(B, Hkv, 1, n_c, cs, D)
    vf = torch.nn.functional.pad(v.float(), (0, 0, 0, pad)).view(B, Hkv, 1, n_c, cs, v.shape[-1])
    has_q = q_ok.any(-1)  # [B, NC]
    step = max(1, CHUNK_ELEMS // (B * H * cs * cs))
    for s in range(0, n_c, step):
        e = min(s + step, n_c)
        kv_ok = valid[:, None, None, s:e, None, :]  # [B, 1, 1, n, 1, cs]
        sc = (qf[:, :, :, s:e] @ kf[:, :, :, s:e].transpose(-1, -2)) * scale  # [B, Hkv, G, n, cs, cs]
        att = torch.softmax(sc.masked_fill(~kv_ok, float("-inf")), dim=-1).nan_to_num(0.0)
        out = att @ vf[:, :, :, s:e]  # [B, Hkv, G, n, cs, Dv]
        w_q = q_ok[:, None, None, s:e, :, None].to(out.dtype)
        probe = (out * w_q).sum(-2) / w_q.sum(-2).clamp_min(1)  # [B, Hkv, G, n, Dv]
        ws = (probe[..., None, :] @ kf[:, :, :, s:e].transpose(-1, -2))[..., 0, :] * scale  # [B, Hkv, G, n, cs]
        ws = torch.softmax(ws.masked_fill(~valid[:, None, None, s:e], float("-inf")), dim=-1).nan_to_num(0.0)
        key = (ws[..., None, :] @ kf[:, :, :, s:e])[..., 0, :]  # [B, Hkv, G, n, D]
        key = key.reshape(B, H, e - s, D)
        summary[:, :, s:e] = torch.where(has_q[:, None, s:e, None], key, summary[:, :, s:e])
    return summary


def chunk_layout(allowed: torch.Tensor, first_qb: int, bs: int, cs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-level candidates and forced chunks, each [B, NQ, NC] bool, from block-level `allowed`."""
    B, n_q, n_k = allowed.shape
    cpb = cs // bs
    n_c = -(-n_k // cpb)
    pad = n_c * cpb - n_k
    ch_allowed = torch.nn.functional.pad(allowed, (0, pad)).view(B, n_q, n_c, cpb).any(-1)
    cur = (torch.arange(first_qb, first_qb + n_q, device=allowed.device) // cpb)[None, :, None]  # [1, NQ, 1]
    c = torch.arange(n_c, device=allowed.device)[None, None, :]
    forced = ((c == 0) | (c == cur) | (c == cur - 1)) & ch_allowed
    return ch_allowed & (c <= cur), forced


def chunks_for_density(
    density: float, n_avail: torch.Tensor, ch_allowed: torch.Tensor, forced: torch.Tensor, cpb: int
) -> int:
    """One chunk count for every query block so the call's block count is near `density` of causal."""
    n_ch = ch_allowed.sum(-1)  # [B, NQ] candidate chunks per row
    n_f = forced.sum(-1)
    forced_blocks = torch.minimum(n_f * cpb, n_avail)  # forced chunks, the partial current one rounded up
    target = density * (n_avail.double() - 0.5).clamp_min(0).sum()
    best, best_err = int(ch_allowed.shape[-1]), float("inf")
    for n in range(FORCED_CHUNKS, max(FORCED_CHUNKS, int(n_ch.max()) if n_ch.numel() else 0) + 1):
        extra = (torch.clamp(torch.minimum(n_ch, torch.full_like(n_ch, n)) - n_f, min=0)) * cpb
        blocks = torch.where(n_ch <= n, n_avail, torch.minimum(forced_blocks + extra, n_avail))
        err = abs(float((blocks.double() - 0.5).clamp_min(0).sum()) - target)
        if err < best_err:
            best, best_err = n, err
    return best


def chunk_blocks(allowed: torch.Tensor, cpb: int) -> torch.Tensor:
    """[B, NQ, NC] long: the allowed key blocks of each chunk, per query block."""
    B, n_q, n_k = allowed.shape
    n_c = -(-n_k // cpb)
    return torch.nn.functional.pad(allowed, (0, n_c * cpb - n_k)).view(B, n_q, n_c, cpb).sum(-1)


def rank_chunks_per_query(
    q: torch.Tensor, summary: torch.Tensor, ch_allowed: torch.Tensor, forced: torch.Tensor, rows: torch.Tensor,
    k_cap: int, Tk: int, bs: int,
) -> torch.Tensor:
    """Each query's best `k_cap` chunks, forced ones first: [B, H, NQ, bs, k_cap] long (NC: none).

    q [B, H, Tq, D]; summary [B, H, NC, D]; ch_allowed, forced [B, NQ, NC]; rows [B, NQ, bs] marks the
    grid rows holding a real query (the others choose nothing). A query's ranking reads its own query
    and the chunk summaries only (the reference's per-token `global_qk`).
    """
    B, H = q.shape[:2]
    n_q, n_c = ch_allowed.shape[1], ch_allowed.shape[2]
    k_cap = max(1, min(k_cap, n_c))
    qg, _ = grid_queries(q.float(), Tk, bs)  # [B, H, NQ, bs, D]
    ranked = torch.empty(B, H, n_q, bs, k_cap, dtype=torch.long, device=q.device)
    step = max(1, CHUNK_ELEMS // (B * H * bs * n_c))
    for s in range(0, n_q, step):
        e = min(s + step, n_q)
        sc = qg[:, :, s:e] @ summary[:, :, None].transpose(-1, -2)  # [B, H, n, bs, NC]
        sc = sc.masked_fill(~ch_allowed[:, None, s:e, None], float("-inf"))
        sc = sc.masked_fill(forced[:, None, s:e, None], float("inf"))
        vals, idx = sc.topk(k_cap, dim=-1)
        ok = (vals > float("-inf")) & rows[:, None, s:e, :, None]
        ranked[:, :, s:e] = torch.where(ok, idx, n_c)
    return ranked


def union_controller(
    union: torch.Tensor, budget: torch.Tensor, k_forced: torch.Tensor, k_all: torch.Tensor, has_rows: torch.Tensor,
    cpb: int,
) -> torch.Tensor:
    """Chunks per query for every query block and head, [B, H, NQ], from earlier query blocks only.

    union: [B, H, NQ, k_cap + 1], entry k - 1 = key blocks of the block's union when every query keeps
    k chunks; budget: [B, NQ] key blocks (density_budget); k_forced, k_all: [B, NQ] forced and visible
    chunks; has_rows: [B, NQ] the block holds a real query; cpb: key blocks per chunk. The controller
    tracks the union's blocks per chunk of per-query count (EMA, from cpb: queries that agree) and the
    blocks overspent or saved so far (debt), both measured on earlier query blocks, so no query's
    count depends on a later token.
    """
    B, H, n_q, _ = union.shape
    growth = torch.full((B, H), float(cpb), dtype=torch.float64, device=union.device)
    debt = torch.zeros(B, H, dtype=torch.float64, device=union.device)
    k_out = torch.empty(B, H, n_q, dtype=torch.long, device=union.device)
    for j in range(n_q):
        b = budget[:, j, None].double()
        kf, ka = k_forced[:, j, None], k_all[:, j, None]
        k = torch.floor((b + debt).clamp_min(0) / growth).long()
        k = torch.minimum(torch.maximum(k, kf), ka).clamp(1, union.shape[-1] - 1)  # [B, H]
        k_out[:, :, j] = k
        size = torch.gather(union[:, :, j], -1, (k - 1)[..., None])[..., 0].double()
        free = has_rows[:, j, None] & (kf < ka)  # query blocks where the count is a choice
        growth = torch.where(free & (k > kf), 0.5 * growth + 0.5 * (size / k).clamp_min(1.0), growth)
        debt = torch.where(free, (debt + b - size).clamp_min(-b), debt)
    return k_out


@register(
    "longheads",
    family="sparse",
    phases=("prefill",),
    params=LongHeadsParams,
    summary="LongHeads: each query of each head keeps the first + local chunks + its top chunks by chunk-key affinity.",
)
class LongHeads(SparseMethod):
    exact_params = {"density": 1.0}  # every chunk kept: equals dense attention

    def prefill(self, q, k, v, ctx):
        t0 = estimate_clock(q)
        support = self.support(q, k, ctx, v)
        estimate_s = estimate_clock(q) - t0
        res = block_sparse_attention(
            q, k, v, support, causal=True, window=ctx.window, scale=ctx.scale, key_valid=ctx.key_valid
        )
        return AttnOutput(res.out, res.cells, estimate_s, res.lse)

    def support(self, q, k, ctx, v=None):
        """Chunk selection as a block support; `v` is needed by the "attn" chunk summary only."""
        p = self.params
        B, H, Tq, _ = q.shape
        Tk = k.shape[2]
        bs = p.block_size
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, q.device)
        cs = p.chunk_size
        if p.density is not None:
            mean_len = float(layout.n_avail.double().mean()) * bs
            while cs > bs and FORCED_CHUNKS * cs > 0.5 * p.density * mean_len:
                cs = max(bs, (cs // 2) // bs * bs)
        cpb = cs // bs
        ch_allowed, forced = chunk_layout(layout.allowed, layout.first_qb, bs, cs)
        n_ch = ch_allowed.sum(-1)  # [B, NQ] chunks a query of the block can see
        full = layout.allowed[:, None].expand(B, H, layout.n_q, layout.n_k)
        if p.density is not None and p.per_query:
            n_blk = chunk_blocks(layout.allowed, cpb)  # [B, NQ, NC] blocks of each chunk in scope
            budget = density_budget(p.density, layout.n_avail, (n_blk * forced).sum(-1))
            if bool((budget >= layout.n_avail).all()):
                return BlockSupport.from_mask(full, bs)
            keep = n_ch  # the controller sets the count; rank every chunk
        else:
            if p.density is not None:
                n_chunks = chunks_for_density(p.density, layout.n_avail, ch_allowed, forced, cpb)
            else:
                n_chunks = p.max_len // cs
            keep = torch.minimum(torch.full_like(n_ch, n_chunks), n_ch)
            if bool((keep >= n_ch).all()):  # every chunk kept (within max_len): dense
                return BlockSupport.from_mask(full, bs)

        repr_ = p.chunk_repr if v is not None else "mean"
        summary = chunk_keys(q, k, v, ctx.key_valid, cs, ctx.scale, repr_)  # [B, H, NC, D]
        if not p.per_query:
            q_r = lagged_block_queries(q, Tk, bs, ctx.key_valid)  # [B, H, NQ, D]
            scores = q_r @ summary.transpose(-1, -2)  # [B, H, NQ, NC]
            chunks = topk_support(scores, ch_allowed, forced, keep, cs).to_mask(ch_allowed.shape[-1])
            blocks = chunks.repeat_interleave(cpb, dim=-1)[..., : layout.n_k] & layout.allowed[:, None]
            return BlockSupport.from_mask(blocks, bs)

        rows = real_query_rows(Tq, Tk, bs, ctx.key_valid, B, q.device)  # [B, NQ, bs]
        ranked = rank_chunks_per_query(q, summary, ch_allowed, forced, rows, int(keep.max()), Tk, bs)
        n_c = ch_allowed.shape[-1]
        k_cap = ranked.shape[-1]
        # first_rank[..., c]: the best slot any query of the block gave chunk c, so the union of the
        # queries' top-k chunks is {first_rank < k} for every k
        slot = torch.arange(k_cap, device=q.device).expand_as(ranked).reshape(B, H, layout.n_q, -1)
        first_rank = torch.full((B, H, layout.n_q, n_c + 1), k_cap, dtype=torch.long, device=q.device)
        first_rank.scatter_reduce_(-1, ranked.reshape(B, H, layout.n_q, -1), slot, reduce="amin")
        first_rank = first_rank[..., :n_c]
        if p.density is not None:
            union = torch.zeros(B, H, layout.n_q, k_cap + 1, dtype=torch.long, device=q.device)
            union.scatter_add_(-1, first_rank, n_blk[:, None].expand(B, H, -1, -1))
            k_per = union_controller(union.cumsum(-1), budget, forced.sum(-1), n_ch, rows.any(-1), cpb)
        else:
            k_per = keep[:, None].expand(B, H, layout.n_q)
        union_chunks = first_rank < k_per[..., None]  # [B, H, NQ, NC]
        blocks = union_chunks.repeat_interleave(cpb, dim=-1)[..., : layout.n_k] & layout.allowed[:, None]
        support = BlockSupport.from_mask(blocks, bs)
        # each query row keeps the slots whose chunk is among its own first k_per
        slots = support.blocks  # [B, H, NQ, K]
        mine = torch.zeros(B, H, layout.n_q, bs, n_c + 1, dtype=torch.bool, device=q.device)
        own = torch.arange(k_cap, device=q.device) < k_per[..., None, None]  # [B, H, NQ, 1, k_cap]
        mine.scatter_(-1, ranked, own.expand_as(ranked))  # column n_c: "no chunk"
        slot_chunk = torch.where(slots >= 0, slots // cpb, n_c)[:, :, :, None, :].expand(-1, -1, -1, bs, -1)
        row_mask = torch.gather(mine, -1, slot_chunk) & (slots >= 0)[:, :, :, None, :]
        return BlockSupport(slots, bs, row_mask)

"""MInference's vertical-slash pattern: each head attends a few key columns and a few diagonals.

Per head, the softmax of the last `last_q` queries against the keys ranks key columns (column
sums, "vertical") and diagonals (sums along query - key offsets, "slash"); the head then attends
its top `vertical_size` columns and top `slash_size` diagonals, the first columns (attention sinks)
and the nearest diagonals (local window) always included. Jiang et al., "MInference 1.0:
Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention", NeurIPS 2024
(arXiv:2407.02490); reference implementation microsoft/MInference.

Hyperparameters (defaults are the reference's, unscaled): `vertical_size` (columns kept per head,
1000) and `slash_size` (diagonals kept per head, 6096), with MInference's floors of 30 and 50 and
capped at the context; `last_q` (estimation queries, 64); `sink_columns` (first real key columns
always kept, 30); `local_diagonals` (nearest diagonals always kept, 100); `causal` (False, the
paper: estimate from the call's own last queries; True: the leak-free chunked estimate below);
`ref_context` (opt-in, default None: when set, both sizes scale with Tk / ref_context, a scaling
the reference does not do); `chunk` (query tokens per estimation chunk when `causal=True`);
`density` (when set, scales `vertical_size` and `slash_size` together, keeping their ratio, so the
measured density lands near it); `block_size` (64, MInference's kernel block).

Estimation (default, `causal=False`, as in MInference's `vertical_and_slash_kernel` in
minference/modules/minference_forward.py): per head, the softmax of the call's last `last_q`
queries against all keys (causal on the last_q x last_q tail) gives column sums and diagonal sums;
the first `sink_columns` columns and the `local_diagonals` nearest diagonals are forced; the top
`vertical_size` columns and `slash_size` diagonals form one pattern that every query of the call
uses (each query only sees keys at or before its position). In a single prefill Tq = Tk and the
estimation queries are the prompt's last ones, so an early output depends on the prompt's last
tokens: outputs are not prefix-consistent. When prefill is chunked (Tq < Tk) the pattern of a
chunk comes from the chunk's own last queries against all keys so far, as a serving engine with
chunked prefill does.

Execution follows MInference's kernel: per query block a diagonal at offset o covers the keys
[start - o, end - o), i.e. at most two key blocks (block offsets floor(o / bs) and ceil(o / bs));
the union of these is run by the block kernel. Columns not already inside a covered key block go
through the token-gather kernel (only columns before the end of the query block), and the two
parts merge through their log-sum-exp.

`causal=True` (leak-free, for prefix-consistent outputs): the query blocks are split into chunks
of `chunk` tokens (default: the context / 8, rounded up to whole blocks, at least 4 blocks); the
pattern of chunk c is estimated from the `last_q` queries just before the chunk's start against the
keys before that start, and applied to the chunk's queries. The first chunk has nothing before it:
it gets the static part of the pattern (sink columns and the nearest diagonals). Estimation cost is
about n_chunks x last_q x T / 2 score cells instead of last_q x T. The price: a question at the end
of a prompt no longer picks the columns its own chunk attends. On gemma3-270m at 4k (pass key), the
needle's first digit ranks 5th in the retrieval heads' column sums over the prompt's own last 64
queries, but ~3500th of 3584 over the 64 queries before the last chunk.

Deviations from the reference, and why:
- Slash ranges are covered with aligned key blocks rather than MInference's unaligned 64-wide
  ranges (the shared block kernel works on aligned blocks), so an isolated diagonal costs up to
  two blocks instead of one; runs of neighbouring diagonals cost the same.
- Under `density`, the floors (30 / 50) give way to the target: forced columns and diagonals keep
  top priority (nearest diagonals and earliest sinks first), and the main diagonal is always kept.
  The scale is calibrated (per chunk when causal) by bisection on the cell count of the resulting
  support (computed from block and column counts, no attention).
- MInference's per-head pattern search (offline, one sample) is not run: every head uses the
  vertical-slash pattern with the shared sizes, MInference's default for heads without a search.
- Padding keys (left padding in a batch) never count as columns, sinks or estimation queries.

Exact setting: `density=1.0` keeps every causal block (equals dense attention).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from attnsieve.kernels import (
    BlockSupport,
    drop_covered,
    token_mask,
)
from attnsieve.kernels.block_sparse import cdiv
from attnsieve.methods.base import SparseMethod
from attnsieve.methods.registry import register
from attnsieve.methods.selection import BlockLayout, block_layout

# Priority of forced columns / diagonals: above any sum of softmax rows (at most last_q).
FORCED = 1e6
# MInference's minimum sizes (vertical, slash) when sizes come from the paper parameters.
VERTICAL_FLOOR, SLASH_FLOOR = 30, 50
# Default chunking: the context split into this many estimation chunks, each at least MIN blocks.
N_CHUNKS, MIN_CHUNK_BLOCKS = 8, 4


@dataclass
class VerticalSlashParams:
    vertical_size: int = field(default=1000, metadata={"help": "key columns kept per head (>= 0; floor 30)"})
    slash_size: int = field(default=6096, metadata={"help": "diagonals kept per head (>= 1; floor 50)"})
    causal: bool = field(
        default=False,
        metadata={"help": "False (paper): estimate from the call's own last queries; True: leak-free chunked estimate"},
    )
    ref_context: int | None = field(
        default=None, metadata={"help": "opt-in: context the sizes are for, scaled by Tk/ref_context (None: unscaled)"}
    )
    last_q: int = field(
        default=64, metadata={"help": "estimation queries: the call's last ones (causal: before a chunk) (>= 1)"}
    )
    sink_columns: int = field(default=30, metadata={"help": "first real key columns always kept (>= 0)"})
    local_diagonals: int = field(default=100, metadata={"help": "nearest diagonals always kept (>= 1, the main one)"})
    chunk: int | None = field(
        default=None,
        metadata={"help": "causal=True: query tokens per estimation chunk, a multiple of block_size; None: Tk/8"},
    )
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; scales both sizes when set"}
    )
    block_size: int = field(default=64, metadata={"help": "query/key block of the kernels (16..512)"})

    def __post_init__(self):
        if self.vertical_size < 0:
            raise ValueError(f"vertical_size must be >= 0, got {self.vertical_size}")
        if self.slash_size < 1:
            raise ValueError(f"slash_size must be >= 1, got {self.slash_size}")
        if self.ref_context is not None and self.ref_context < 1:
            raise ValueError(f"ref_context must be >= 1 token or None, got {self.ref_context}")
        if self.last_q < 1:
            raise ValueError(f"last_q must be >= 1, got {self.last_q}")
        if self.sink_columns < 0:
            raise ValueError(f"sink_columns must be >= 0, got {self.sink_columns}")
        if self.local_diagonals < 1:
            raise ValueError(f"local_diagonals must be >= 1 (the main diagonal), got {self.local_diagonals}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.chunk is not None and (self.chunk < self.block_size or self.chunk % self.block_size):
            raise ValueError(f"chunk must be a positive multiple of block_size={self.block_size}, got {self.chunk}")


def last_q_scores(
    q: torch.Tensor, k: torch.Tensor, start: int, last_q: int, scale: float, window: int | None, key_valid
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Column sums and diagonal sums of softmax(q k^T) of the last_q queries before `start`.

    Only keys before `start` take part (causal, inside the window, padding excluded). Returns
    (vertical [B, H, start] indexed by key position, slash [B, H, start] indexed by offset
    query - key), or None when no query lies before `start` in this call.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    p0 = max(start - last_q, Tk - Tq)
    if p0 >= start:
        return None
    L = start - p0
    qe = q[:, :, p0 - (Tk - Tq) : start - (Tk - Tq)].float()  # [B, H, L, D]
    ke = k[:, :, :start].float()  # [B, Hkv, start, D]
    s = (qe.reshape(B, Hkv, G * L, D) @ ke.transpose(-1, -2)).view(B, H, L, start) * scale
    # Causal mask: only the [L, L] tail holds keys after some estimation query.
    tail = s[..., p0:]
    tail.masked_fill_(torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    if window is not None and start - 1 - window >= 0:
        q_pos, k_pos = torch.arange(p0, start, device=q.device), torch.arange(start, device=q.device)
        s.masked_fill_(~token_mask(q_pos, k_pos, causal=False, window=window), float("-inf"))
    if key_valid is not None:
        s.masked_fill_(~key_valid[:, None, None, :start], float("-inf"))
        s.masked_fill_(~key_valid[:, None, p0:start, None], float("-inf"))
    prob = torch.softmax(s, dim=-1)
    if key_valid is not None:
        prob = prob.nan_to_num_(0.0)  # padding rows (no key) contribute nothing
    vertical = prob.sum(2)  # [B, H, start]
    # Diagonal sums: row r (position p0 + r) puts key t on offset p0 + r - t. Flipping the keys and
    # padding by L turns each diagonal into a column of a strided view (one copy, no index tensor).
    W = start + L
    flipped = torch.nn.functional.pad(prob.flip(-1), (0, L)).contiguous()  # [B, H, L, W]
    skew = flipped.as_strided((B, H, L, start), (H * L * W, L * W, W - 1, 1), flipped.storage_offset() + L - 1)
    slash = skew.sum(2)  # [B, H, start] indexed by offset
    return vertical, slash


@dataclass
class _Grid:
    """Per-call geometry that the cell counts of a support need."""

    layout: BlockLayout
    abs_qb: torch.Tensor  # [NQ] grid index of each query block
    cellw: torch.Tensor  # [B, NQ, NK] exact cells of (query block, key block), per head
    rows: torch.Tensor  # [B, NQ] real query rows of a query block (per head)


def make_grid(Tq: int, Tk: int, bs: int, key_valid, window, B: int, device) -> _Grid:
    layout = block_layout(Tq, Tk, bs, key_valid, window, B, device)
    n_k, first = layout.n_k, layout.first_qb
    valid = torch.zeros(B, n_k * bs, dtype=torch.bool, device=device)
    valid[:, :Tk] = True if key_valid is None else key_valid.to(device, torch.bool)
    is_q = valid.clone()
    is_q[:, : Tk - Tq] = False
    q_real = is_q.view(B, n_k, bs)[:, first:]  # [B, NQ, bs]
    kv_blk = valid.view(B, n_k, bs)
    rows = q_real.sum(-1).double()  # [B, NQ]
    diag = (kv_blk[:, first:].cumsum(-1) * q_real).sum(-1).double()  # [B, NQ] causal cells of the diagonal block
    abs_qb = torch.arange(first, first + layout.n_q, device=device)
    kb = torch.arange(n_k, device=device)
    cellw = rows[:, :, None] * kv_blk.sum(-1).double()[:, None, :]  # [B, NQ, NK]
    cellw = torch.where(kb[None, None] == abs_qb[None, :, None], diag[:, :, None], cellw)
    cellw = cellw * layout.allowed  # window partial blocks count whole: an estimate for calibration only
    return _Grid(layout, abs_qb, cellw, rows)


class _Choice:
    """A chunk's ranked columns and diagonals; the support and its cell count for any budget."""

    def __init__(self, vscore: torch.Tensor, sscore: torch.Tensor, grid: _Grid, j0: int, j1: int, bs: int):
        dev = vscore.device
        n_k = grid.layout.n_k
        v_val, self.v_pos = vscore.sort(dim=-1, descending=True)  # [B, H, Lv]
        s_val, s_off = sscore.sort(dim=-1, descending=True)  # [B, H, Ls]
        B, H, Ls = s_off.shape
        self.v_ok = v_val > float("-inf")
        self.v_blk = torch.where(self.v_ok, self.v_pos // bs, n_k)  # key block of each ranked column
        # A diagonal at offset o covers block offsets floor(o / bs) and ceil(o / bs); `first` is the
        # best rank of a diagonal covering each block offset, so the top ns cover {first < ns}.
        rank = torch.arange(Ls, device=dev).expand(B, H, Ls)
        rank = torch.where(s_val > float("-inf"), rank, Ls)
        first = torch.full((B, H, n_k + 1), Ls, dtype=torch.long, device=dev)
        first.scatter_reduce_(-1, (s_off // bs).clamp_max(n_k), rank, reduce="amin")
        first.scatter_reduce_(-1, cdiv_t(s_off, bs).clamp_max(n_k), rank, reduce="amin")
        first[..., n_k] = Ls  # slot n_k: "no block offset"
        diff = grid.abs_qb[j0:j1, None] - torch.arange(n_k, device=dev)[None, :]  # [nj, NK]
        diff = torch.where(diff >= 0, diff, n_k)
        allowed = grid.layout.allowed[:, None, j0:j1]  # [B, 1, nj, NK]
        self.first = first[:, :, diff].masked_fill(~allowed, Ls)  # [B, H, nj, NK] rank covering the block
        self.cellw = grid.cellw[:, None, j0:j1]  # [B, 1, nj, NK] (zero where not allowed)
        # Rows a column outside the blocks adds cells to: all rows of a query block for a column in an
        # earlier key block, about half in its own block, none after it (look-ahead columns can be).
        kb = torch.arange(n_k, device=dev)[None, :]
        qb = grid.abs_qb[j0:j1, None]
        part = torch.where(kb < qb, 1.0, torch.where(kb == qb, 0.5, 0.0)).double()  # [nj, NK]
        self.roww = grid.rows[:, None, j0:j1, None] * allowed * part  # [B, 1, nj, NK]
        self.n_k = n_k

    def blocks(self, ns: torch.Tensor) -> torch.Tensor:
        """[B, H, nj, NK] key blocks covered by the top-ns diagonals (ns: [B])."""
        return self.first < ns[:, None, None, None]

    def columns(self, nv: torch.Tensor) -> torch.Tensor:
        """[B, H, Lv] key positions of the top-nv columns (-1 elsewhere), nv: [B]."""
        take = (torch.arange(self.v_pos.shape[-1], device=nv.device) < nv[:, None, None]) & self.v_ok
        return torch.where(take, self.v_pos, -1)

    def cells(self, nv: torch.Tensor, ns: torch.Tensor) -> torch.Tensor:
        """[B] cells (all heads) of the support with the top nv columns and ns diagonals.

        Blocks count their exact causal cells; a column outside the covered blocks adds one cell
        per query row (columns lie before the chunk). Window edges count whole: calibration only.
        """
        covered = self.blocks(ns)
        B, H, Lv = self.v_blk.shape
        take = (torch.arange(Lv, device=nv.device) < nv[:, None, None]).double().expand(B, H, Lv)
        per_block = torch.zeros(B, H, self.n_k + 1, dtype=torch.float64, device=nv.device)
        per_block.scatter_add_(-1, self.v_blk, take)
        uncovered = (self.roww * ~covered).sum(2)  # [B, H, NK] query rows per key block outside the blocks
        return (covered * self.cellw).sum((1, 2, 3)) + (uncovered * per_block[..., : self.n_k]).sum((1, 2))


def cdiv_t(a: torch.Tensor, b: int) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


@register(
    "vertical-slash",
    family="sparse",
    phases=("prefill",),
    params=VerticalSlashParams,
    summary="MInference: per-head top key columns + top diagonals estimated from the prompt's last queries.",
)
class VerticalSlash(SparseMethod):
    selects_tokens = True  # support() adds single key tokens to its blocks
    exact_params = {"density": 1.0}  # degenerate setting: every causal block, equals dense

    def chunk_tokens(self, Tk: int) -> int:
        p = self.params
        if p.chunk is not None:
            return p.chunk
        bs = p.block_size
        return max(MIN_CHUNK_BLOCKS * bs, cdiv(cdiv(Tk, N_CHUNKS), bs) * bs)

    def sizes(self, Tk: int) -> tuple[int, int]:
        """The reference sizes with MInference's floors (scaled by Tk / ref_context only when that is set)."""
        p = self.params
        f = 1.0 if p.ref_context is None else Tk / p.ref_context
        return max(VERTICAL_FLOOR, round(p.vertical_size * f)), max(SLASH_FLOOR, round(p.slash_size * f))

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx) -> tuple[BlockSupport, torch.Tensor]:
        """The support: key blocks [B, H, NQ, K] and extra column tokens [B, H, NQ, M] (disjoint)."""
        p = self.params
        B, H, Tq, _ = q.shape
        Tk = k.shape[2]
        bs = p.block_size
        dev = q.device
        grid = make_grid(Tq, Tk, bs, ctx.key_valid, ctx.window, B, dev)
        n_q, n_k = grid.layout.n_q, grid.layout.n_k
        if p.density is not None and p.density >= 1:
            full = grid.layout.allowed[:, None].expand(B, H, n_q, n_k)
            return BlockSupport.from_mask(full, bs), torch.full((B, H, n_q, 1), -1, dtype=torch.long, device=dev)

        C = self.chunk_tokens(Tk)
        nv0, ns0 = self.sizes(Tk)
        if ctx.key_valid is None:
            rank = torch.arange(Tk, device=dev).expand(B, -1)
            real = torch.ones(B, Tk, dtype=torch.bool, device=dev)
        else:
            real = ctx.key_valid.to(dev, torch.bool)
            rank = real.long().cumsum(-1) - 1  # rank of each real key among the real keys
        sink = real & (rank < p.sink_columns)
        mask = torch.zeros(B, H, n_q, n_k, dtype=torch.bool, device=dev)
        col_parts = []
        if p.causal:  # chunk c: query blocks [j0, j1), estimated from the queries before `start`
            chunk_of = torch.arange(grid.layout.first_qb, grid.layout.first_qb + n_q) * bs // C  # [NQ] on the host
            chunks = [(int((chunk_of < c).sum()), int((chunk_of <= c).sum()), c * C)
                      for c in torch.unique(chunk_of).tolist()]
        else:  # the paper: one pattern for the whole call, from its own last queries over all keys
            chunks = [(0, n_q, Tk)]
        for j0, j1, start in chunks:
            c = start // C
            est = last_q_scores(q, k, start, p.last_q, ctx.scale, ctx.window, ctx.key_valid) if start else None
            if est is not None:
                vscore, sscore = est
                L = start
            else:  # nothing before the chunk: the static part (sinks, nearest diagonals first)
                L = min(Tk, (c + 1) * C)
                vscore = torch.full((B, H, L), float("-inf"), device=dev)
                sscore = -torch.arange(L, device=dev, dtype=torch.float32).expand(B, H, L).clone()
            off = torch.arange(L, device=dev, dtype=torch.float32)
            vscore = torch.where(sink[:, None, :L], FORCED - rank[:, None, :L].float(), vscore)
            vscore = vscore.masked_fill(~real[:, None, :L], float("-inf"))
            sscore = torch.where(off < p.local_diagonals, FORCED - off, sscore)
            choice = _Choice(vscore, sscore, grid, j0, j1, bs)
            nv, ns = self._budget(choice, grid, j0, j1, L, nv0, ns0, B, dev)
            mask[:, :, j0:j1] = choice.blocks(ns)
            cols = choice.columns(nv).sort(dim=-1, descending=True).values  # used slots first
            col_parts.append((j0, j1, cols, nv.max()))
        # Every chunk lists at most nv columns: one host read of the widest for all chunks.
        M = max(1, int(torch.stack([nv_max for *_, nv_max in col_parts]).max()))
        tokens = torch.full((B, H, n_q, M), -1, dtype=torch.long, device=dev)
        for j0, j1, cols, _ in col_parts:
            cols = cols[..., :M]
            tokens[:, :, j0:j1, : cols.shape[-1]] = cols[:, :, None]
        # A query block never attends keys after its last position (only look-ahead columns can be).
        block_end = ((grid.abs_qb + 1) * bs)[None, None, :, None]
        tokens = torch.where(tokens < block_end, tokens, -1)
        support = BlockSupport.from_mask(mask, bs)
        return support, drop_covered(tokens, support)

    def _budget(self, choice: _Choice, grid: _Grid, j0, j1, L, nv0, ns0, B, dev):
        """(nv, ns) per batch row: the paper sizes capped at the context, or a scale landing near the density."""
        p = self.params
        if p.density is None:
            nv = torch.full((B,), min(nv0, L), dtype=torch.long, device=dev)
            ns = torch.full((B,), min(ns0, L), dtype=torch.long, device=dev)
            return nv, ns
        ratio = p.vertical_size / p.slash_size

        def nv_of(ns):
            return torch.round(ns.double() * ratio).long()

        target = p.density * choice.cellw.sum((1, 2, 3)) * choice.first.shape[1]  # [B], all heads
        lo = torch.ones(B, dtype=torch.long, device=dev)
        hi = torch.full((B,), L, dtype=torch.long, device=dev)
        # Largest ns whose cells stay within the target: as many halvings as the interval [1, L] needs, not
        # a host read of `lo < hi` per step (a row that has converged keeps its lo through the extra steps).
        for _ in range((L - 1).bit_length()):
            mid = (lo + hi + 1) // 2
            fits = choice.cells(nv_of(mid), mid) <= target
            lo = torch.where(fits, mid, lo)
            hi = torch.where(fits, hi, mid - 1)
        up = (lo + 1).clamp_max(L)
        below, above = choice.cells(nv_of(lo), lo), choice.cells(nv_of(up), up)
        ns = torch.where((above - target).abs() < (target - below).abs(), up, lo)
        return nv_of(ns), ns

    def support(self, q, k, ctx):
        support, tokens = self.plan(q, k, ctx)
        return dataclasses.replace(support, tokens=tokens)

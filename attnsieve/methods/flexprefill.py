"""FlexPrefill: per head, choose between query-aware block selection and a vertical-slash pattern, each sized by
the attention mass it must cover.

For every head, the attention of a few recent queries is computed exactly and compared, by the square-root
Jensen-Shannon divergence, with the estimate that pooled (block-averaged) queries and keys give: a head whose
pooled estimate is faithful (divergence < `tau`) selects key blocks per query block from pooled scores until their
mass reaches `gamma`; any other head keeps the vertical key tokens and slash (diagonal) offsets whose mass reaches
`gamma`. Lai et al., "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence
Inference", ICLR 2025 (arXiv:2502.20766); reference code bytedance/FlexPrefill.

Hyperparameters (defaults are the reference's, unscaled):
- `gamma`: cumulative attention mass the selection must cover (paper 0.9-0.95; default 0.9).
- `tau`: sqrt-JS-divergence threshold below which a head is query-aware (paper 0.1).
- `min_budget`: fewest vertical / slash tokens per head, as whole blocks ceil(min_budget / block_size) (1024, at
  every length in the reference's RULER scripts).
- `max_budget`: most vertical / slash tokens per head (None: unbounded).
- `causal`: False (the paper): estimate from the call's own last queries; True: the leak-free chunked estimate.
- `ref_context`: opt-in (default None): when set, `min_budget` scales by Tk / ref_context, which the reference
  does not do.
- `density`: when set, overrides `gamma` and `min_budget`: gamma is calibrated so the measured density lands
  near it.
- `block_size`: query/key block of the pooled estimate and of the kernel (paper 128).
- `last_q`: estimation queries (None: one block, the paper's last query block).
- `chunks`: estimation chunks of the leak-free estimate (`causal=True` only).

Estimation (default, `causal=False`), as the reference's `get_active_blocks` in
flex_prefill/ops/flex_prefill_attention.py: a call of at most max(2 * block_size, ceil(min_budget / block_size) *
block_size) keys runs dense. Otherwise the call's last `last_q` queries attend all keys exactly (causal on the
tail); vertical = mean attention per key, slash = diagonal sums / last_q. Per head, the vertical (slash) budget is
the number of tokens (offsets) whose sorted mass first covers gamma, turned into blocks as `count // block_size +
1` and clamped to [ceil(min_budget / bs), min(ceil(max_budget / bs), blocks)]. A head is query-aware when the
sqrt-JS divergence between softmax(mean estimation query . mean-pooled keys) and the block sums of the vertical
mass is below `tau`; its budgets drop to the minimum. Vertical and slash masses are summed into key blocks and
block diagonals (the slash pooled from the main diagonal outwards, as the reference pools its reversed offsets),
the first key block and the main block diagonal forced; each head keeps its top vertical key blocks (for every
query block at or after them) and its top block diagonals. A query-aware head adds: each query block's own
pooled queries against the pooled keys, softmax per row over the key blocks at or before it (diagonal
included), and the blocks of the flattened matrix taken largest first while their cumulative mass stays within
gamma x (number of query blocks). Everything runs on the block kernel with the token-level causal mask. In a
single prefill Tq = Tk and the estimation queries are the prompt's last ones, so early outputs depend on the
prompt's last tokens. When prefill is chunked (Tq < Tk) the chunk's own last queries estimate against all keys
so far, and the short-input rule looks at Tk.

Deviations from the reference (default path): block counts use `// block_size + 1` where the reference
hard-codes `// 128 + 1` (the same at the default block of 128); padding keys (left padding in a batch) are left
out of every mean and the first real key block is the forced one; the reference's batch-size-1 restriction does
not apply.

`density` (a budget the paper does not have) replaces gamma (one for all heads, by bisection) and the minimum
budget (one block), and counts the vertical / slash blocks as the fewest ranked blocks (the forced one first)
whose pooled mass covers gamma. The reference's `count // block_size + 1` gives a peaked head that covers gamma
with a few tokens one block, which the forced first block takes, so under a tight budget a retrieval head keeps
its sink and loses the needle it attends (gemma3-270m, 4k pass key, density 0.2, the first two samples: 0 of 2
keys found with the token count, 1 of 2 with the block cover).

`causal=True` (leak-free, for prefix-consistent outputs). The sequence is split into `chunks` block-aligned
estimation chunks; the decision, the budgets and the vertical/slash choice for chunk c come from the `last_q`
queries just before chunk c's start against the keys before it. The first chunk has nothing before it: it runs
dense when it is short (the paper's short-input rule), else only its sink, diagonal and `min_budget` slash
blocks. Vertical tokens are kept as single tokens (run on the token-gather kernel) and cannot be chosen inside
their own chunk; slashes are block diagonals. Query-aware selection is per query block and lagged: query block j
ranks the key blocks before it with the pooled query of block j - 1 and keeps blocks until their mass reaches
`gamma` within that row. Under `density`, gamma is calibrated per (batch row, chunk) on the vertical-slash heads
from that chunk's estimate, and each chunk's target carries over what earlier chunks over- or under-spent. The
estimate scores about last_q * Tk * chunks / 2 cells. A question at the very end of a prompt cannot steer the
keys its own chunk keeps: on a 4k pass-key prompt the retrieval heads put ~17% of the question's attention on
the needle but ~0% of the attention of the queries before the last chunk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from attnsieve.kernels import BlockSupport
from attnsieve.methods._block_token import GridCells, mask_to_list
from attnsieve.methods.base import SparseMethod
from attnsieve.methods.registry import register
from attnsieve.methods.selection import block_layout, density_budget, forced_blocks, grid_queries

# Points per calibration grid (a coarse scan of gamma in [0, 1], then a fine one inside the crossing step).
CALIBRATION_POINTS = 33


@dataclass
class FlexPrefillParams:
    gamma: float = field(default=0.9, metadata={"help": "attention mass each selection must cover, in (0, 1]"})
    tau: float = field(default=0.1, metadata={"help": "sqrt-JS-divergence threshold for query-aware heads (>= 0)"})
    min_budget: int = field(default=1024, metadata={"help": "fewest vertical/slash tokens per head (>= 1)"})
    max_budget: int | None = field(
        default=None, metadata={"help": "most vertical/slash tokens per head (>= 1; None: unbounded)"}
    )
    causal: bool = field(
        default=False,
        metadata={"help": "False (paper): estimate from the call's own last queries; True: leak-free chunked estimate"},
    )
    ref_context: int | None = field(
        default=None, metadata={"help": "opt-in: context min_budget is for, scaled by Tk/ref_context (None: unscaled)"}
    )
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides gamma and min_budget when set"}
    )
    block_size: int = field(default=128, metadata={"help": "tokens per query/key block (16..512; paper 128)"})
    last_q: int | None = field(
        default=None, metadata={"help": "estimation queries before each chunk (>= 1; None: block_size)"}
    )
    chunks: int = field(default=8, metadata={"help": "causal=True: estimation chunks per sequence (>= 1)"})

    def __post_init__(self):
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.tau < 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")
        if self.min_budget < 1:
            raise ValueError(f"min_budget must be >= 1 token, got {self.min_budget}")
        if self.max_budget is not None and self.max_budget < 1:
            raise ValueError(f"max_budget must be >= 1 token or None, got {self.max_budget}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")
        if self.last_q is not None and self.last_q < 1:
            raise ValueError(f"last_q must be >= 1 query or None, got {self.last_q}")
        if self.ref_context is not None and self.ref_context < 1:
            raise ValueError(f"ref_context must be >= 1 token or None, got {self.ref_context}")
        if self.chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {self.chunks}")


@dataclass
class FlexPlan:
    """What FlexPrefill decided for one call (the support plus what the tests inspect)."""

    support: BlockSupport  # blocks per [B, H, NQ]
    tokens: torch.Tensor | None  # [B, H, NQ, M] vertical key tokens (-1 unused), before dropping covered ones
    query_aware: torch.Tensor  # [B, H, C] bool: head chose query-aware selection in chunk c
    estimated: torch.Tensor  # [B, C] bool: chunk c had an estimate (else dense or sink + local)
    chunk_blocks: int  # grid blocks per chunk
    vertical: list  # per chunk: [B, H, s_c] vertical mass of its estimate (None when not estimated)
    slash: list  # per chunk: [B, H, s_c] slash mass by offset (None when not estimated)
    gamma: list  # per chunk: [B] gamma used ([B, H] on the default look-ahead path, equal over heads)


def sqrt_js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sqrt(JSD(p, q)) in nats over the last axis; zero entries contribute nothing."""
    m = 0.5 * (p + q)
    js = 0.5 * (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1) + 0.5 * (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return js.clamp_min(0).sqrt()


def coverage_count(mass: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Fewest entries whose largest values sum to >= gamma: [..., N] mass, gamma broadcastable to [...]."""
    csum = mass.sort(dim=-1, descending=True).values.cumsum(-1)
    return (csum < gamma[..., None]).sum(-1) + 1


def inverse_rank(order: torch.Tensor) -> torch.Tensor:
    """rank[..., i] = position of entry i in `order` (a permutation along the last axis)."""
    slots = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, slots)


@register(
    "flexprefill",
    family="sparse",
    phases=("prefill",),
    params=FlexPrefillParams,
    summary="FlexPrefill: per-head JS-divergence choice of query-aware blocks or vertical-slash, sized by mass gamma.",
)
class FlexPrefill(SparseMethod):
    selects_tokens = True  # support() adds single key tokens to its blocks
    exact_params = {"density": 1.0}  # degenerate setting: equals dense attention

    def support(self, q, k, ctx):
        plan = self.plan(q, k, ctx)
        return dataclasses.replace(plan.support, tokens=plan.tokens)

    def plan(self, q, k, ctx) -> FlexPlan:
        p = self.params
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G = H // Hkv
        bs = p.block_size
        dev = q.device
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, dev)
        fq, n_q, n_k = layout.first_qb, layout.n_q, layout.n_k
        L = -(-n_k // p.chunks)  # grid blocks per chunk, chunks aligned on the absolute grid
        n_c = -(-n_k // L)
        min_tok = p.min_budget if p.ref_context is None else max(1, round(p.min_budget * Tk / p.ref_context))
        if p.density is not None:  # the density target replaces every budget
            min_tok = 1
        max_tok = Tk if p.max_budget is None else p.max_budget
        plan = FlexPlan(
            None, None, torch.zeros(B, H, n_c, dtype=torch.bool, device=dev),
            torch.zeros(B, n_c, dtype=torch.bool, device=dev), L, [None] * n_c, [None] * n_c, [None] * n_c,
        )
        allowed = layout.allowed[:, None].expand(B, H, n_q, n_k)
        if not p.causal:
            short = max(2 * bs, -(-min_tok // bs) * bs)
            if (p.density is not None and p.density >= 1) or Tk <= short:
                plan.support = BlockSupport.from_mask(allowed, bs)
                return plan
            return self._paper_plan(q, k, ctx, layout, plan, min_tok, max_tok)
        if (p.density is not None and p.density >= 1) or Tk <= max(2 * bs, min_tok):
            plan.support = BlockSupport.from_mask(allowed, bs)
            return plan

        grid = GridCells.build(Tq, Tk, bs, ctx.key_valid, B, dev)
        valid = grid.real_key  # [B, NK * bs]
        kf = k.float()
        kpad = torch.nn.functional.pad(kf, (0, 0, 0, n_k * bs - Tk)).view(B, Hkv, n_k, bs, D)
        kvm = valid.view(B, 1, n_k, bs, 1)
        kbar = (kpad * kvm).sum(3) / kvm.sum(3).clamp_min(1)  # [B, Hkv, NK, D] mean of real keys
        has_key = valid.view(B, n_k, bs).any(-1)  # [B, NK]
        qg, rows = grid_queries(q.float(), Tk, bs)  # [B, H, NQ, bs, D], [NQ, bs]
        qreal = rows[None] & valid.view(B, n_k, bs)[:, fq:]  # [B, NQ, bs]
        qbar = (qg * qreal[:, None, :, :, None]).sum(3) / qreal.sum(-1)[:, None, :, None].clamp_min(1)  # [B,H,NQ,D]
        q_has = qreal.any(-1)  # [B, NQ]
        forced = forced_blocks(layout, 1, 1)  # [B, NQ, NK] sink + diagonal
        min_slash = -(-min_tok // bs)

        mask = torch.zeros(B, H, n_q, n_k, dtype=torch.bool, device=dev)
        lists: list[tuple[int, int, torch.Tensor]] = []
        spent = torch.zeros(B, dtype=torch.float64, device=dev)
        exact_so_far = torch.zeros(B, dtype=torch.float64, device=dev)
        last_q = p.last_q or bs
        for c in range(n_c):
            a, e = max(c * L, fq), min((c + 1) * L, n_k)  # grid blocks of chunk c holding this call's queries
            if a >= e:
                continue
            ja, je = a - fq, e - fq
            s_c = c * L * bs  # first position of chunk c
            ex_c = grid.exact[:, ja:je].sum(-1).double() * H  # [B]
            exact_so_far += ex_c
            d_c = None
            if p.density is not None:
                d_c = ((p.density * exact_so_far - spent) / ex_c.clamp_min(1)).clamp(0, 1)  # [B]

            # Unestimated rows: dense while the sequence so far is short (paper's rule), else sink + local.
            real_so_far = valid[:, : e * bs].sum(-1)
            tiny = real_so_far <= max(2 * bs, min_tok)
            kb = torch.arange(n_k, device=dev)
            jabs = torch.arange(a, e, device=dev)
            local = (jabs[:, None] - kb[None, :] >= 0) & (jabs[:, None] - kb[None, :] < min_slash)
            fallback = torch.where(tiny[:, None, None], layout.allowed[:, ja:je], forced[:, ja:je] | local[None])
            fallback = (fallback & layout.allowed[:, ja:je])[:, None].expand(B, H, -1, -1)

            lo_q = max(s_c - last_q, Tk - Tq)
            est = None
            if c > 0 and lo_q < s_c:
                est = self._estimate(q, kf, kbar, has_key, valid, lo_q, s_c, Tq, Tk, ctx)
            if est is None:
                mask[:, :, ja:je] = fallback
                spent += grid.block_cells(fallback, ja).sum((1, 2)).double()
                continue
            vert, slash, qa, ok_b = est
            plan.estimated[:, c] = ok_b
            plan.query_aware[:, :, c] = qa & ok_b[:, None]
            plan.vertical[c], plan.slash[c] = vert, slash
            blocks, sel_v, gamma = self._select_chunk(
                vert, slash, qa, d_c, grid, forced, layout, ja, je, a, e, s_c, min_tok, max_tok, H,
            )
            if bool(qa.any()):
                qa_mask = self._query_aware_blocks(qbar, q_has, kbar, has_key, layout, forced, ja, je, a, d_c, Hkv, G,
                                                   ctx.scale)
                blocks = torch.where(qa[:, :, None, None], blocks | qa_mask, blocks)
            blocks = torch.where(ok_b[:, None, None, None], blocks, fallback)
            sel_v = sel_v & ok_b[:, None, None]
            plan.gamma[c] = gamma
            mask[:, :, ja:je] = blocks
            counts = torch.nn.functional.pad(sel_v.view(B, H, -1, bs).sum(-1), (0, n_k - s_c // bs))[:, :, None]
            spent += (grid.block_cells(blocks, ja) + grid.token_cells(counts, blocks, ja)).sum((1, 2)).double()
            lists.append((ja, je, mask_to_list(sel_v)))

        plan.support = BlockSupport.from_mask(mask, bs)
        if lists:
            width = max(t.shape[-1] for _, _, t in lists)
            tokens = torch.full((B, H, n_q, width), -1, dtype=torch.long, device=dev)
            for ja, je, t in lists:
                tokens[:, :, ja:je, : t.shape[-1]] = t[:, :, None]
            plan.tokens = tokens
        return plan

    def _paper_plan(self, q, k, ctx, layout, plan, min_tok, max_tok) -> FlexPlan:
        """The reference's `get_active_blocks` on this call: one estimate from its last queries (see the docstring)."""
        p = self.params
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G, bs, dev = H // Hkv, p.block_size, q.device
        fq, n_q, n_k = layout.first_qb, layout.n_q, layout.n_k
        grid = GridCells.build(Tq, Tk, bs, ctx.key_valid, B, dev)
        valid = grid.real_key  # [B, NK * bs]
        has_key = valid.view(B, n_k, bs).any(-1)  # [B, NK]

        # 1. The last n queries of the call against every key, exactly (causal on the n x n tail).
        n = min(p.last_q or bs, Tq)
        qe = q[:, :, Tq - n :].float()  # [B, H, n, D]
        kf = k.float()
        scores = (qe.view(B, Hkv, G, n, D) @ kf[:, :, None].transpose(-1, -2)).view(B, H, n, Tk) * ctx.scale
        pos = torch.arange(Tk - n, Tk, device=dev)
        kpos = torch.arange(Tk, device=dev)
        future = kpos[None, :] > pos[:, None]
        if ctx.window is not None:
            future = future | (pos[:, None] - kpos[None, :] >= ctx.window)
        scores = scores.masked_fill(future, float("-inf"))
        q_real = valid[:, Tk - n : Tk]  # [B, n]
        if ctx.key_valid is not None:
            scores = scores.masked_fill(~valid[:, None, None, :Tk], float("-inf"))
        probs = scores.softmax(-1)
        if ctx.key_valid is not None:  # padding queries (rows with no key) contribute nothing
            probs = probs.nan_to_num(0.0) * q_real[:, None, :, None]
        n_real = q_real.sum(-1).clamp_min(1)[:, None, None]  # [B, 1, 1]
        vert = probs.sum(2) / n_real  # [B, H, Tk] mean attention per key
        shifted = torch.nn.functional.pad(probs.flip(2), (0, n)).flatten(2)[..., : n * (Tk + n - 1)]
        slash = shifted.view(B, H, n, Tk + n - 1).sum(2)[..., :Tk].flip(-1) / n_real  # [B, H, Tk] by offset

        # 2. Masses in blocks: vertical by key block; slash by block diagonal s (offsets pooled from the
        # main diagonal outwards: the reference sum-pools offsets reversed, Tk - 1 - o, from index 0).
        pad = n_k * bs - Tk
        v_blk = torch.nn.functional.pad(vert, (0, pad)).view(B, H, n_k, bs).sum(-1)  # [B, H, NK]
        s_blk = torch.nn.functional.pad(slash.flip(-1), (0, pad)).view(B, H, n_k, bs).sum(-1).flip(-1)  # [B, H, NK]

        # 3. Pattern decision: softmax(mean estimation query . mean-pooled keys) against the block mass.
        kvm = valid.view(B, 1, n_k, bs, 1)
        kbar = (torch.nn.functional.pad(kf, (0, 0, 0, pad)).view(B, Hkv, n_k, bs, D) * kvm).sum(3)
        kbar = kbar / kvm.sum(3).clamp_min(1)  # [B, Hkv, NK, D] mean of real keys
        qe_bar = (qe * q_real[:, None, :, None]).sum(2) / n_real  # [B, H, D]
        pooled = (qe_bar.view(B, Hkv, G, 1, D) @ kbar[:, :, None].transpose(-1, -2)).view(B, H, n_k) * ctx.scale
        pooled = torch.where(has_key[:, None], pooled.masked_fill(~has_key[:, None], float("-inf")).softmax(-1), 0.0)
        query_aware = sqrt_js_divergence(pooled, v_blk) < p.tau  # [B, H]

        # 4. Query-aware heads: own-block pooled queries, per-row softmax, flattened cover.
        qg, rows = grid_queries(q.float(), Tk, bs)  # [B, H, NQ, bs, D]
        qreal = rows[None] & valid.view(B, n_k, bs)[:, fq:]  # [B, NQ, bs]
        qbar = (qg * qreal[:, None, :, :, None]).sum(3) / qreal.sum(-1)[:, None, :, None].clamp_min(1)
        qa_scores = (qbar.view(B, Hkv, G * n_q, D) @ kbar.transpose(-1, -2)).view(B, H, n_q, n_k) * ctx.scale
        cand = layout.allowed & qreal.any(-1)[..., None]  # [B, NQ, NK] blocks at or before each query block
        qa_probs = torch.where(cand[:, None], qa_scores.masked_fill(~cand[:, None], float("-inf")).softmax(-1), 0.0)
        flat = qa_probs.flatten(2)  # [B, H, NQ * NK]
        order = flat.argsort(-1, descending=True)
        csum = flat.gather(-1, order).cumsum(-1)
        qa_rank = inverse_rank(order)
        n_rows = cand.any(-1).sum(-1).double()  # [B] query blocks with a candidate

        # 5. Vertical-slash blocks.
        v_rank = inverse_rank(v_blk.masked_fill(~has_key[:, None], float("-inf"))
                              .scatter(-1, layout.sink[:, None, None].expand(B, H, 1), float("inf"))
                              .argsort(-1, descending=True))
        s_rank = inverse_rank(s_blk.clone().index_fill_(-1, torch.tensor([0], device=dev), float("inf"))
                              .argsort(-1, descending=True))
        cv = vert.sort(-1, descending=True).values.cumsum(-1)  # [B, H, Tk]
        cs = slash.sort(-1, descending=True).values.cumsum(-1)
        # Under `density`: cumulative block mass in rank order (forced block first), for block covers.
        cv_blk = torch.gather(v_blk, -1, v_rank.argsort(-1)).cumsum(-1)  # [B, H, NK]
        cs_blk = torch.gather(s_blk, -1, s_rank.argsort(-1)).cumsum(-1)
        qb = torch.arange(fq, fq + n_q, device=dev)[:, None]  # [NQ, 1]
        kb = torch.arange(n_k, device=dev)[None, :]  # [1, NK]
        diag_of = (qb - kb).clamp(0, n_k - 1)  # [NQ, NK] block diagonal of each (query block, key block)
        max_b = min(-(-max_tok // bs), n_k)

        def select(gamma: torch.Tensor, min_b: int) -> torch.Tensor:  # gamma [B, H] -> blocks [B, H, NQ, NK]
            g = gamma.contiguous()[..., None]
            if p.density is None:  # the reference: tokens covering gamma -> count // bs + 1 blocks
                nv = (torch.searchsorted(cv, g, right=True)[..., 0] + 1) // bs + 1
                ns = (torch.searchsorted(cs, g, right=True)[..., 0] + 1) // bs + 1
            else:  # density: the fewest ranked blocks (forced one first) whose mass covers gamma
                nv = torch.searchsorted(cv_blk, g)[..., 0] + 1
                ns = torch.searchsorted(cs_blk, g)[..., 0] + 1
            nv = torch.where(query_aware, min_b, nv.clamp(min_b, max_b))
            ns = torch.where(query_aware, min_b, ns.clamp(min_b, max_b))
            vs = (v_rank < nv[..., None])[:, :, None, :] | torch.gather(
                (s_rank < ns[..., None]), -1, diag_of.reshape(1, 1, -1).expand(B, H, -1)
            ).view(B, H, n_q, n_k)
            aware = (csum <= (gamma * n_rows[:, None])[..., None]).gather(-1, qa_rank).view(B, H, n_q, n_k)
            blocks = vs | (aware & query_aware[..., None, None])
            return blocks & layout.allowed[:, None]

        if p.density is None:
            gamma = torch.full((B, H), p.gamma, dtype=torch.float64, device=dev)
            blocks = select(gamma.float(), min(-(-min_tok // bs), max_b))
        else:  # cells grow with gamma: bisection for the one gamma whose cells land nearest the target
            target = p.density * grid.exact.sum(-1).double() * H  # [B]
            lo = torch.zeros(B, dtype=torch.float64, device=dev)
            hi = torch.ones(B, dtype=torch.float64, device=dev)

            def cells(gm):  # [B] -> [B]
                return grid.block_cells(select(gm[:, None].expand(B, H).float(), 1)).sum((1, 2)).double()

            for _ in range(20):
                mid = (lo + hi) / 2
                over = cells(mid) > target
                hi, lo = torch.where(over, mid, hi), torch.where(over, lo, mid)
            below, above = cells(lo), cells(hi)
            gamma = torch.where((above - target).abs() < (target - below).abs(), hi, lo)[:, None].expand(B, H)
            blocks = select(gamma.float(), 1)
        plan.support = BlockSupport.from_mask(blocks, bs)
        plan.query_aware = query_aware[..., None]
        plan.estimated = q_real.any(-1)[:, None]
        plan.chunk_blocks = n_k
        plan.vertical, plan.slash, plan.gamma = [vert], [slash], [gamma.float()]
        return plan

    def _estimate(self, q, kf, kbar, has_key, valid, lo_q, s_c, Tq, Tk, ctx):
        """Exact attention of queries [lo_q, s_c) over keys [0, s_c): vertical and slash mass, pattern decision.

        Returns vertical [B, H, s_c] (mean attention per key), slash [B, H, s_c] (mean attention per offset),
        query_aware [B, H] and ok [B] (rows with at least one real estimation query), or None.
        """
        B, H, _, D = q.shape
        Hkv, bs = kf.shape[1], self.params.block_size
        G = H // Hkv
        pos = torch.arange(lo_q, s_c, device=q.device)  # absolute query positions
        n = pos.numel()
        q_real = valid[:, lo_q:s_c]  # [B, n]
        ok_b = q_real.any(-1)
        if not bool(ok_b.any()):
            return None
        qe = q[:, :, lo_q - (Tk - Tq) : s_c - (Tk - Tq)].float()  # [B, H, n, D]
        ke = kf[:, :, :s_c]  # [B, Hkv, s_c, D]
        scores = (qe.view(B, Hkv, G, n, D) @ ke[:, :, None].transpose(-1, -2)).view(B, H, n, s_c).mul_(ctx.scale)
        ninf = float("-inf")
        scores[..., lo_q:].masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), ninf)  # causal
        if ctx.window is not None:
            kpos = torch.arange(s_c, device=q.device)
            scores.masked_fill_(pos[:, None] - kpos[None, :] >= ctx.window, ninf)
        if ctx.key_valid is not None:
            scores.masked_fill_(~valid[:, None, None, :s_c], ninf)
        probs = scores.softmax(-1)
        if ctx.key_valid is not None:  # padding queries (rows with no key: NaN) contribute nothing
            probs = probs.nan_to_num_(0.0).mul_(q_real[:, None, :, None])
        n_real = q_real.sum(-1).clamp_min(1)[:, None, None]  # [B, 1, 1]
        vert = probs.sum(2) / n_real  # [B, H, s_c]
        # Slash mass by offset d = query - key: reverse the rows and shift row r right by n - 1 - r (a flat
        # view with one column less per row), so that column s_c - 1 - d holds offset d in every row.
        shifted = torch.nn.functional.pad(probs.flip(2), (0, n)).flatten(2)[..., : n * (s_c + n - 1)]
        slash = shifted.view(B, H, n, s_c + n - 1).sum(2)[..., :s_c].flip(-1) / n_real  # [B, H, s_c]

        # Pattern decision: pooled estimate softmax(mean(q) . mean-pooled K) vs the block sums of the true mass.
        nb = s_c // bs
        qe_bar = (qe * q_real[:, None, :, None]).sum(2) / n_real  # [B, H, D]
        pooled = (qe_bar.view(B, Hkv, G, 1, D) @ kbar[:, :, None, :nb].transpose(-1, -2)).view(B, H, nb) * ctx.scale
        pooled = pooled.masked_fill(~has_key[:, None, :nb], float("-inf")).softmax(-1)
        pooled = torch.where(has_key[:, None, :nb], pooled, 0.0)
        true_blocks = vert.view(B, H, nb, bs).sum(-1)
        query_aware = sqrt_js_divergence(pooled, true_blocks) < self.params.tau
        return vert, slash, query_aware, ok_b

    def _select_chunk(self, vert, slash, qa, d_c, grid, forced, layout, ja, je, a, e, s_c, min_tok, max_tok, H):
        """Vertical-slash selection of one chunk: (block mask [B, H, n, NK], vertical tokens [B, H, s_c], gamma [B])."""
        p = self.params
        B, dev = vert.shape[0], vert.device
        bs, n_k = p.block_size, layout.n_k
        nb = s_c // bs
        real = grid.real_key[:, None, :s_c]  # [B, 1, s_c]
        cv = vert.sort(-1, descending=True).values.cumsum(-1)  # [B, H, s_c]
        cs = slash.sort(-1, descending=True).values.cumsum(-1)
        rank_v = inverse_rank(vert.argsort(-1, descending=True))
        slash_blocks = slash.view(B, H, nb, bs).sum(-1)
        slash_blocks[..., 0] = float("inf")  # the diagonal block is always kept
        rank_s = inverse_rank(slash_blocks.argsort(-1, descending=True))
        n_real = real.sum(-1)  # [B, 1]
        jabs = torch.arange(a, e, device=dev)
        off = jabs[:, None] - torch.arange(n_k, device=dev)[None, :]  # [n, NK] block diagonal of each key block
        in_range = (off >= 0) & (off < nb)
        base = (forced[:, None, None, ja:je] & layout.allowed[:, None, None, ja:je])  # [B, 1, 1, n, NK]
        allowed = layout.allowed[:, None, None, ja:je]

        def select(gamma):  # gamma [B, P] -> (blocks [B, H, P, n, NK], sel_v [B, H, P, s_c])
            P = gamma.shape[1]
            g = gamma[:, None, :].expand(B, H, P).contiguous()
            kv = (torch.searchsorted(cv, g) + 1).clamp_min(min_tok).clamp_max(max_tok)  # [B, H, P]
            ks = (torch.searchsorted(cs, g) + 1).clamp_min(min_tok).clamp_max(max_tok)
            kv = torch.where(qa[..., None], min_tok, kv).clamp_max(n_real[..., None])
            ks = torch.where(qa[..., None], min_tok, ks)
            ks_blk = (ks + bs - 1) // bs  # slash offsets -> block diagonals
            diag = rank_s[:, :, None] < ks_blk[..., None]  # [B, H, P, nb] chosen block diagonals
            off_idx = off.clamp(0, nb - 1).reshape(1, 1, 1, -1).expand(B, H, P, -1)
            slash_mask = torch.gather(diag, -1, off_idx).view(B, H, P, -1, n_k) & in_range
            blocks = base | (slash_mask & allowed)
            sel_v = (rank_v[:, :, None] < kv[..., None]) & real[:, :, None]
            return blocks, sel_v

        if d_c is None:
            gamma = torch.full((B,), p.gamma, device=dev)
            blocks, sel_v = select(gamma[:, None])
            return blocks[:, :, 0], sel_v[:, :, 0], gamma

        vs = (~qa).to(torch.float64)  # [B, H]
        want = d_c * grid.exact[:, ja:je].sum(-1).double() * vs.sum(-1)  # [B] cells allowed to the VS heads

        def cells(gamma):  # [B, P] -> cells of the VS heads [B, P]
            P = gamma.shape[1]
            blocks, sel_v = select(gamma)
            counts = torch.nn.functional.pad(sel_v.view(B, H, P, nb, bs).sum(-1), (0, n_k - nb))
            bm = blocks.reshape(B, H * P, -1, n_k)
            per = grid.block_cells(bm, ja) + grid.token_cells(counts.reshape(B, H * P, 1, n_k), bm, ja)
            return (per.sum(-1).view(B, H, P).double() * vs[..., None]).sum(1)

        # Cells grow with gamma: scan a coarse grid, then a fine grid inside the bracketing step.
        steps = torch.linspace(0, 1, CALIBRATION_POINTS, device=dev)
        coarse = steps.expand(B, -1)
        below = (cells(coarse) <= want[:, None]).sum(-1) - 1  # last coarse point within the target
        lo = coarse.gather(1, below.clamp(0, CALIBRATION_POINTS - 1)[:, None])
        hi = coarse.gather(1, (below + 1).clamp(0, CALIBRATION_POINTS - 1)[:, None])
        fine = lo + (hi - lo) * steps
        best = (cells(fine) - want[:, None]).abs().argmin(-1)
        gamma = fine.gather(1, best[:, None])[:, 0]
        blocks, sel_v = select(gamma[:, None])
        return blocks[:, :, 0], sel_v[:, :, 0], gamma

    def _query_aware_blocks(self, qbar, q_has, kbar, has_key, layout, forced, ja, je, a, d_c, Hkv, G, scale):
        """Per query block j, key blocks before j ranked by the pooled query of block j - 1: [B, H, n, NK]."""
        p = self.params
        B, H, _, D = qbar.shape
        n, n_k, dev = je - ja, layout.n_k, qbar.device
        prev = torch.arange(ja - 1, je - 1, device=dev)
        has_prev = (prev >= 0)[None] & q_has[:, prev.clamp_min(0)]  # [B, n]
        qprev = qbar[:, :, prev.clamp_min(0)]  # [B, H, n, D]
        scores = (qprev.view(B, Hkv, G, n, D) @ kbar[:, :, None].transpose(-1, -2)).view(B, H, n, n_k) * scale
        jabs = torch.arange(a, a + n, device=dev)
        cand = layout.allowed[:, ja:je] & (torch.arange(n_k, device=dev)[None, :] < jabs[:, None])[None]
        cand = cand & has_key[:, None, :] & has_prev[..., None]  # [B, n, NK] blocks wholly before block j
        probs = scores.masked_fill(~cand[:, None], float("-inf")).softmax(-1)
        probs = torch.where(cand[:, None], probs, 0.0)
        f = forced[:, None, ja:je]
        if d_c is None:
            keep = coverage_count(probs, torch.full((B, H, n), p.gamma, device=dev))
            keep = torch.minimum(keep, cand.sum(-1)[:, None])
            rank = inverse_rank(probs.argsort(-1, descending=True))
            return ((rank < keep[..., None]) & cand[:, None]) | f
        keep = density_budget(d_c[:, None], layout.n_avail[:, ja:je], forced[:, ja:je].sum(-1))  # [B, n]
        ranked = torch.where(f, float("inf"), torch.where(cand[:, None], probs, float("-inf")))
        rank = inverse_rank(ranked.argsort(-1, descending=True))
        return (rank < keep[:, None, :, None]) & (cand[:, None] | f)

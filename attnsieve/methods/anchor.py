"""AnchorAttention: keep the key columns (stripes) whose pooled-query score comes within `theta` of an anchor.

Every query computes its initial region and local window exactly; the largest of those scores is its anchor
(initial tokens and the local window hold the maxima of most attention rows). Queries pooled per block then
score the other earlier keys, and a key is kept, as a stripe shared by a group of `step` query blocks, where its
pooled score is at most `theta` below the pooled anchor of some block of the group. Zhang et al.,
"AnchorAttention: Difference-Aware Sparse Attention with Stripe Granularity", EMNLP 2025 (arXiv:2505.23520);
reference: the authors' AnchorAttn code, `anchorattn` (block_size 128, step 16, difference 12) with its three
Triton steps `get_mask_fused_anchor_triton` (anchors), `get_q_mask_triton` (stripes; the PyTorch twin is
`get_mask_block`) and `_triton_stripe_sparse_attn_fwd_kernel_step3`.

Hyperparameters (defaults are the reference's, unscaled by length):
- `theta`: score difference to the anchor within which a key is kept (12, in nats of the scaled score).
- `step`: query blocks per group sharing one stripe list; the initial region and the local window are one group
  long (None: 16, the reference's, at every length; under `density`, the largest step up to 16 whose initial
  region and local windows stay within half the target, so stripes have room: 1 at 4k).
- `causal`: False (the paper, default): a group's stripes come from its own blocks' pooled queries and anchors;
  True: from the previous group's (leak-free, below).
- `density`: when set, overrides `theta`: theta is calibrated per group so the measured density lands near it.
- `block_size`: tokens per query block of the pooled estimate and per key block of the exact part (128).

At the reference's defaults a group is 2048 tokens, so up to 4k the initial region and the local window cover
every key and the method is dense; stripes start to matter from 6k on.

Estimation (default, `causal=False`, as the reference's `get_q_mask_triton`): the queries of each block of group g
are averaged (its own queries), and so are their anchors; key t is a stripe of group g when, for some block of
the group, pooled anchor - scale * pooled query . k_t <= theta. Candidates are the keys from the second block to
the block before the last one ahead of the group (the reference scans key blocks 1 .. g * step - 2; those inside
the initial region are already attended). Every query of the group attends the union, so a later block of the
group changes the keys an earlier one sees; outputs are not prefix-consistent. When prefill is chunked (Tq < Tk)
only the group's blocks present in the call are pooled.

`causal=True` (leak-free, for prefix caching and teacher-forced perplexity): the stripes of group g are chosen by
the pooled queries and pooled anchors of group g - 1 (lagged by one group; all of it lies before group g starts),
among all real keys between the initial region and the group's start; groups 0 and 1 have only their initial
region and local window, as group 0 does in the paper. The price: a question at the very end of a prompt cannot
steer the stripes of its own group (on a 4k pass-key prompt the needle gets ~17% of the question's attention in
the retrieval heads but ~0.5% of the previous block's), so at density 0.2 the lagged stripes miss the needle.

Execution: the initial region (the first group of real keys) and the local window (from the start of the
query's group to the query) run on the block kernel; stripes run on the token-gather kernel; the parts cover
disjoint keys and merge through their log-sum-exp. The paper reuses the online-softmax state of its anchor pass
for the initial + local part; here the anchors (row maxima) are computed in a separate score-only pass, which is
reported as estimation time, because the shared block kernel returns a log-sum-exp, not a row maximum.

Deviations:
- Stripes inside the initial region are not listed again: the reference's stripe pass adds them on top of its
  initial + local state, counting such a key twice in group 1 and beyond; here each key counts once.
- Lengths that are not a multiple of step * block_size (the reference asserts they are) and left padding: blocks
  pool their real queries only, the initial region starts at the first real key block.
- GQA: the reference repeats the KV heads; here each query head scores its group's KV head.
- `density`: per (batch row, group), theta is set to the largest value whose stripes (over all heads) fit the
  group's share of the target cells, carrying over what earlier groups over- or under-spent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from attnsieve.kernels import BlockSupport
from attnsieve.methods._block_token import GridCells, mask_to_list
from attnsieve.methods.base import SparseMethod
from attnsieve.methods.registry import register
from attnsieve.methods.selection import block_layout, grid_queries, kth_smallest

# Largest number of score elements one step of the anchor pass may hold (~64 MB fp32).
ANCHOR_CHUNK_ELEMS = 1 << 24
PAPER_STEP = 16


@dataclass
class AnchorParams:
    theta: float = field(
        default=12.0, metadata={"help": "keep keys whose pooled score is within theta of the pooled anchor (> 0)"}
    )
    step: int | None = field(
        default=None, metadata={"help": "query blocks per stripe group (1..64; None: 16, or sized to density)"}
    )
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides theta when set"}
    )
    block_size: int = field(default=128, metadata={"help": "tokens per query/key block (16..512; paper 128)"})
    causal: bool = field(
        default=False,
        metadata={"help": "False (paper): stripes from the group's own pooled queries; True: the previous group's"},
    )

    def __post_init__(self):
        if not self.theta > 0:
            raise ValueError(f"theta must be > 0, got {self.theta}")
        if self.step is not None and not 1 <= self.step <= 64:
            raise ValueError(f"step must be in [1, 64] blocks or None, got {self.step}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 16 <= self.block_size <= 512:
            raise ValueError(f"block_size must be in [16, 512], got {self.block_size}")


@dataclass
class AnchorPlan:
    """What AnchorAttention decided for one call (the support plus what the tests inspect)."""

    support: BlockSupport  # initial region + local window blocks per [B, H, NQ]
    tokens: torch.Tensor | None  # [B, H, NQ, M] stripe key positions (-1 unused)
    anchors: torch.Tensor | None  # [B, H, Tq] row maximum over the initial region and local window
    step: int  # query blocks per group
    theta: list  # per group: [B] theta used (None where the group had no stripe candidates)


def exact_blocks(layout, S: int) -> torch.Tensor:
    """[B, NQ, NK] bool: the initial region (S blocks from the first real one) and each block's local window."""
    kb = torch.arange(layout.n_k, device=layout.allowed.device)
    jabs = torch.arange(layout.first_qb, layout.first_qb + layout.n_q, device=kb.device)
    sink = layout.sink[:, None, None]  # [B, 1, 1]
    init = (kb >= sink) & (kb < sink + S)  # [B, 1, NK]
    local = (kb[None, :] >= (jabs[:, None] // S) * S) & (kb[None, :] <= jabs[:, None])  # [NQ, NK]
    return (init | local[None]) & layout.allowed


def density_step(density: float, layout, grid: GridCells) -> int:
    """The largest step <= PAPER_STEP whose exact part takes at most half of `density` (at least 1)."""
    steps = range(PAPER_STEP, 1, -1)
    cells = [grid.block_cells(exact_blocks(layout, S)[:, None], 0).sum() for S in steps]
    total, *cells = torch.stack([grid.exact.sum().clamp_min(1), *cells]).tolist()  # one host read for all steps
    return next((S for S, c in zip(steps, cells, strict=True) if c <= density / 2 * total), 1)


@register(
    "anchor",
    family="sparse",
    phases=("prefill",),
    params=AnchorParams,
    summary="AnchorAttention: stripes whose pooled score is within theta of the initial/local anchor.",
)
class Anchor(SparseMethod):
    selects_tokens = True  # support() adds single key tokens to its blocks
    exact_params = {"density": 1.0}  # degenerate setting: equals dense attention

    def support(self, q, k, ctx):
        plan = self.plan(q, k, ctx)
        return dataclasses.replace(plan.support, tokens=plan.tokens)

    def plan(self, q, k, ctx) -> AnchorPlan:
        p = self.params
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G = H // Hkv
        bs, dev = p.block_size, q.device
        layout = block_layout(Tq, Tk, bs, ctx.key_valid, ctx.window, B, dev)
        fq, n_q, n_k = layout.first_qb, layout.n_q, layout.n_k
        grid = GridCells.build(Tq, Tk, bs, ctx.key_valid, B, dev)
        if p.step is not None:
            S = p.step
        elif p.density is None:
            S = PAPER_STEP
        else:
            S = density_step(p.density, layout, grid)
        if p.density is not None and p.density >= 1:
            full = layout.allowed[:, None].expand(B, H, n_q, n_k)
            return AnchorPlan(BlockSupport.from_mask(full, bs), None, None, S, [])

        # Exact part: the initial region (first group of real keys) and the local window (own group so far).
        exact_part = exact_blocks(layout, S)  # [B, NQ, NK]
        support = BlockSupport.from_mask(exact_part[:, None].expand(B, H, n_q, n_k), bs)

        G_tok = S * bs
        init_end = (layout.sink + S) * bs  # [B] first key after the initial region
        n_groups_first, n_groups_end = fq // S, -(-n_k // S)
        last_start = (n_groups_end - 1) * G_tok - (0 if p.causal else bs)  # end of the last group's candidates
        valid = grid.real_key  # [B, NK * bs]
        # One host read decides which groups have a stripe candidate: one whose candidates end after the first
        # real key past some row's initial region.
        pos = torch.arange(n_k * bs, device=dev)
        first_cand = torch.where(valid & (pos >= init_end[:, None]), pos, n_k * bs).amin(-1)  # [B]
        min_init_end, min_first_cand = torch.stack([init_end.min(), first_cand.min()]).tolist()
        if last_start <= min_init_end:  # no group has a stripe candidate (reference defaults up to 4k)
            return AnchorPlan(support, None, None, S, [None] * (n_groups_end - n_groups_first))

        anchors = self._anchors(q, k, valid, layout, S, ctx)  # [B, H, NQ, bs] on the grid
        qg, rows = grid_queries(q.float(), Tk, bs)  # [B, H, NQ, bs, D], [NQ, bs]
        qreal = rows[None] & valid.view(B, n_k, bs)[:, fq:]  # [B, NQ, bs]
        n_real = qreal.sum(-1)  # [B, NQ]
        qbar = (qg * qreal[:, None, :, :, None]).sum(3) / n_real[:, None, :, None].clamp_min(1)  # [B, H, NQ, D]
        abar = torch.where(qreal[:, None], anchors, 0.0).sum(-1) / n_real[:, None].clamp_min(1)  # [B, H, NQ]
        usable = n_real > 0  # [B, NQ] blocks whose pooled query exists

        kf = k.float()
        fixed = grid.block_cells(exact_part[:, None], 0)[:, 0] * H  # [B, NQ] cells of the exact part, all heads
        spent = torch.zeros(B, dtype=torch.float64, device=dev)
        exact_so_far = torch.zeros(B, dtype=torch.float64, device=dev)
        sels: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        thetas = []
        for g in range(n_groups_first, n_groups_end):
            ja, je = max(g * S, fq) - fq, min((g + 1) * S, n_k) - fq  # this call's query blocks of group g
            exact_so_far += grid.exact[:, ja:je].sum(-1).double() * H
            spent += fixed[:, ja:je].sum(-1).double()
            if p.causal:  # the pooled blocks: group g - 1 (lagged); candidates: every key before the group
                la, le = max((g - 1) * S - fq, 0), g * S - fq
                start = g * G_tok
            else:  # the group's own blocks in this call; candidates end a block before the group (reference)
                la, le = ja, je
                start = max(g * G_tok - bs, 0)
            if (p.causal and g < 2) or le <= 0 or la >= le or start <= min_first_cand:
                thetas.append(None)
                continue
            cand = (pos[None, :start] >= init_end[:, None]) & valid[:, :start]  # [B, start]
            # margin_t = min over the pooled blocks of (pooled anchor - pooled score); key t is kept when <= theta.
            scores = (qbar[:, :, la:le].reshape(B, Hkv, G, -1, D) @ kf[:, :, None, :start].transpose(-1, -2))
            margin = abar[:, :, la:le, None] - scores.view(B, H, le - la, start) * ctx.scale
            margin = margin.masked_fill(~usable[:, None, la:le, None], float("inf")).amin(2)  # [B, H, start]
            margin = margin.masked_fill(~cand[:, None], float("inf"))
            rows_g = grid.rows[:, ja:je].sum(-1).double()  # [B] query rows that see every stripe of the group
            if p.density is None:
                theta = torch.full((B,), p.theta, device=dev)
            else:
                budget = p.density * exact_so_far - spent  # cells left for this group's stripes
                n_keep = torch.floor(budget / rows_g.clamp_min(1)).clamp_min(0).long()  # stripes over all heads
                flat = margin.reshape(B, -1)  # [B, H * start]
                n_keep = torch.minimum(n_keep, torch.isfinite(flat).sum(-1))
                # theta = the n_keep-th smallest margin of the row (-inf: none kept), found on the device: the
                # budget recurrence never waits for the host.
                theta = torch.where(n_keep > 0, kth_smallest(flat, n_keep.clamp_min(1)), float("-inf"))
            sel = margin <= theta[:, None, None]  # [B, H, start]
            thetas.append(theta)
            count = sel.sum(-1)  # [B, H] stripes per head
            spent += rows_g * count.sum(-1).double()
            sels.append((ja, je, sel, count.max()))

        tokens = None
        if sels:  # the stripes become token lists once, at the width of the longest (one host read)
            width = max(1, int(torch.stack([most for *_, most in sels]).max()))
            tokens = torch.full((B, H, n_q, width), -1, dtype=torch.long, device=dev)
            for ja, je, sel, _ in sels:
                tokens[:, :, ja:je] = mask_to_list(sel, width)[:, :, None]
        anchors_q = anchors.reshape(B, H, -1)[:, :, (Tk - Tq) - fq * bs :][:, :, :Tq]
        return AnchorPlan(support, tokens, anchors_q, S, thetas)

    def _anchors(self, q, k, valid, layout, S, ctx) -> torch.Tensor:
        """Row maximum of the scaled scores over the initial region and local window: [B, H, NQ, bs] (-inf: none)."""
        p = self.params
        B, H, Tq, D = q.shape
        Hkv, Tk = k.shape[1], k.shape[2]
        G, bs = H // Hkv, p.block_size
        fq, n_q, n_k = layout.first_qb, layout.n_q, layout.n_k
        dev = q.device
        qg, _ = grid_queries(q.float(), Tk, bs)  # [B, H, NQ, bs, D]
        qg = qg.view(B, Hkv, G, n_q, bs, D)
        kp = torch.nn.functional.pad(k.float(), (0, 0, 0, n_k * bs - Tk)).view(B, Hkv, n_k, bs, D)
        jabs = torch.arange(fq, fq + n_q, device=dev)
        # Key blocks per query block: S initial blocks from the sink, then S blocks from the group start
        # (duplicates and blocks after the query do not change a maximum; causality masks the latter).
        slots = torch.arange(S, device=dev)
        init_blocks = layout.sink[:, None, None] + slots  # [B, 1, S]
        local_blocks = ((jabs // S) * S)[None, :, None] + slots  # [1, NQ, S]
        blocks = torch.cat([init_blocks.expand(B, n_q, S), local_blocks.expand(B, n_q, S)], -1).clamp_max(n_k - 1)
        out = torch.full((B, H, n_q, bs), float("-inf"), device=dev)
        step = max(1, ANCHOR_CHUNK_ELEMS // (H * bs * 2 * S * bs))
        row_pos = torch.arange(bs, device=dev)
        col_pos = torch.arange(bs, device=dev)
        for s in range(0, n_q, step):
            e = min(s + step, n_q)
            blk = blocks[:, s:e]  # [B, n, 2S]
            kg = torch.stack([kp[b][:, blk[b]] for b in range(B)])  # [B, Hkv, n, 2S, bs, D]
            kg = kg.view(B, Hkv, 1, e - s, 2 * S * bs, D)
            scores = (qg[:, :, :, s:e] @ kg.transpose(-1, -2)) * ctx.scale  # [B, Hkv, G, n, bs, 2S*bs]
            k_pos = (blk[..., None] * bs + col_pos).reshape(B, e - s, 1, -1)  # [B, n, 1, 2S*bs]
            q_pos = (jabs[s:e, None] * bs + row_pos)[None, :, :, None]  # [1, n, bs, 1]
            ok = (k_pos <= q_pos) & torch.gather(valid, 1, k_pos.reshape(B, -1)).view(B, e - s, 1, -1)
            if ctx.window is not None:
                ok = ok & (q_pos - k_pos < ctx.window)
            scores = scores.masked_fill(~ok[:, None, None], float("-inf"))
            out[:, :, s:e] = scores.amax(-1).view(B, H, e - s, bs)
        return out

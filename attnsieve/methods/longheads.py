"""LongHeads: each attention head attends its own few context chunks, chosen by query-chunk affinity.

The context is split into chunks; each chunk is summarised by one key (the attention-weighted mean
of its keys) and each head's query keeps the first chunk, the local chunks and the chunks whose
summary key scores highest, so the attended length stays within the model's trained length.
Lu, Zhou, He, Zhao, Ji, Gui, Zhang, Huang, "LongHeads: Multi-Head Attention is Secretly a Long
Context Processor", Findings of EMNLP 2024 (arXiv:2402.10685).

Chunk representation (the reference implementation's): inside each chunk the chunk's queries attend
all of the chunk's keys (bidirectionally); the mean of those outputs is a probe vector, and the
chunk's summary key is the softmax(probe . k)-weighted mean of the chunk's keys. `chunk_repr="mean"`
uses the plain key mean instead. Chunks with no query in this call (a KV cache prefix) use the mean.

Hyperparameters:
- `chunk_size`: tokens per chunk (paper: 256), a multiple of `block_size`.
- `max_len`: tokens each query attends, first and local chunks included (paper: 4096, the trained
  length of Llama-2); n_chunks = max_len // chunk_size chunks per query block. Queries whose whole
  causal context fits attend it all, as LongHeads encodes the first max_len tokens densely.
- `density`: target measured density in (0, 1]; overrides the chunk count (one count for every
  query block, searched on the layout so the measured density lands near the target). When the
  three forced chunks alone would take more than half of that budget, the chunk size is halved
  (not below `block_size`) until they fit, so low densities stay reachable at short contexts.
- `chunk_repr`: "attn" (the paper's attention-weighted chunk key) or "mean".
- `block_size`: query block (and kernel block) size, 16..512.

Deviations from the paper, and why:
- Causality (leak-free selection): LongHeads selects chunks per query token. Here the chunks of a
  query block are chosen once, by the mean of the previous block's queries (the first block of a
  call falls back to its first query), so the block kernel can execute them and no query's choice
  depends on a later token; the candidates are chunks that end before the previous chunk starts,
  so a chunk summary (bidirectional inside its chunk) never reveals a later token either.
- Forced chunks follow the reference code: the first chunk, the query's chunk and the one before it.
- Positions: the paper re-encodes the selected chunks with contiguous positions (RoPE inside the
  trained length). The method receives post-RoPE keys, so selected keys keep their true positions,
  and query-chunk scores are post-RoPE dot products (the reference scores un-rotated queries against
  chunk-locally rotated summary keys). For a model used within its trained length, as here, the
  re-encoding is not needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from attnsieve.kernels import BlockSupport, block_sparse_attention
from attnsieve.methods._lagged_blocks import lagged_block_queries
from attnsieve.methods.base import AttnOutput, SparseMethod
from attnsieve.methods.block_topk import key_block_summaries
from attnsieve.methods.registry import register
from attnsieve.methods.selection import block_layout, topk_support

FORCED_CHUNKS = 3  # first chunk, previous chunk, current chunk
CHUNK_ELEMS = 1 << 24  # score elements per step when summarising chunks


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


@register(
    "longheads",
    family="sparse",
    phases=("prefill",),
    params=LongHeadsParams,
    summary="LongHeads: per head, first + local chunks + top chunks by query / chunk-key affinity (256-token chunks).",
)
class LongHeads(SparseMethod):
    exact_params = {"density": 1.0}  # every chunk kept: equals dense attention

    def prefill(self, q, k, v, ctx):
        t0 = time.perf_counter()
        support = self.support(q, k, ctx, v)
        estimate_s = time.perf_counter() - t0
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
        if p.density is not None:
            n_chunks = chunks_for_density(p.density, layout.n_avail, ch_allowed, forced, cpb)
        else:
            n_chunks = p.max_len // cs
        keep = torch.minimum(torch.full_like(layout.n_avail, n_chunks), ch_allowed.sum(-1))
        if bool((keep >= ch_allowed.sum(-1)).all()):  # every chunk kept (within max_len): dense
            full = layout.allowed[:, None].expand(B, H, layout.n_q, layout.n_k)
            return BlockSupport.from_mask(full, bs)

        repr_ = p.chunk_repr if v is not None else "mean"
        summary = chunk_keys(q, k, v, ctx.key_valid, cs, ctx.scale, repr_)  # [B, H, NC, D]
        q_r = lagged_block_queries(q, Tk, bs, ctx.key_valid)  # [B, H, NQ, D]
        scores = q_r @ summary.transpose(-1, -2)  # [B, H, NQ, NC]
        chunks = topk_support(scores, ch_allowed, forced, keep, cs).to_mask(ch_allowed.shape[-1])
        blocks = chunks.repeat_interleave(cpb, dim=-1)[..., : layout.n_k] & layout.allowed[:, None]
        return BlockSupport.from_mask(blocks, bs)

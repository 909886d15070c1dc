"""Exact attention over a block support, without ever materialising a Tq x Tk matrix.

A support says, for every batch row, support head and query block, which key blocks to attend.
The kernel works through the query blocks in chunks, masks at token level only the partial blocks
(causal diagonal, window edge, padding), and returns the normalised output with its log-sum-exp
(so partial results merge) and the number of query-key cells it computed (the numerator of
measured density). Five backends, all exact:

- "compiled": attnsieve's C++ kernel (`csrc/block_sparse_cpu.cpp`, built on first use): per query
  block, flash-style over its key blocks in place, token masks only on partial tiles, online
  softmax in float32. Tile products through MKL's sgemm in float32, and for bf16 inputs through
  the CPU's bf16 matrix units (oneDNN brgemm: bf16 products, float32 accumulation) where present
  (`compiled.bf16_available()`; elsewhere bf16 is converted to float32). The fastest on x86-64.
- "mkl": MKL's batched GEMM multiplies each query block by each of its key blocks where they lie
  (no gathered copies), then one softmax pass and a second batched GEMM with the value blocks.
  Needs no compiler, only the MKL inside torch's x86 wheels.
- "flash": gathers the chunk's key/value blocks and runs torch's fused CPU flash-attention op
  with the chunk's mask.
- "matmul": gathers, then batched matmuls and a softmax; runs on any device and dtype.
- "flex": PyTorch FlexAttention compiled with torch.compile (`flex.py`): Triton on CUDA, where `auto`
  chooses it, C++ on x86 CPUs. "flex-eager" runs FlexAttention uncompiled, which computes the whole
  score matrix: for tests only, never chosen by `auto`, and its cells count every score it computed.

Query blocks and key blocks share one grid of absolute positions: block j covers positions
[j * bs, (j + 1) * bs). Query i of a chunk sits at absolute position Tk - Tq + i, so with
Tq < Tk (chunked prefill, decoding) the first query block is (Tk - Tq) // bs and may be partial.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass

import torch

from attnsieve.kernels import compiled, flex, mkl_batch
from attnsieve.kernels.dense import exact_cells, softmax_with_lse

# torch's fused CPU flash-attention op (an internal aten op, present since torch 2.2) returns the
# log-sum-exp with the output, which the public SDPA does not; without it the kernel runs the
# separate matmul / mask / softmax passes.
_HAS_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")

# Largest number of score + gathered key/value elements one batched step may hold (~64 MB fp32).
DEFAULT_CHUNK_ELEMS = 1 << 24
# The MKL backend holds scores and probabilities only; chunks this small stay in the L2/L3 caches.
MKL_CHUNK_ELEMS = 1 << 21

BACKENDS = ("compiled", "mkl", "flash", "matmul", "flex", "flex-eager")


# The backend that calls naming none run: set per attention call by `patch(model, ..., backend=)`, so
# every method's kernel calls (and the exact local layers) take it without a parameter of their own.
_PREFERRED: contextvars.ContextVar[str | None] = contextvars.ContextVar("attnsieve_backend", default=None)


def check_backend_name(backend: str | None) -> None:
    """Raise ValueError naming the allowed values unless `backend` is None, "auto" or a known backend."""
    if backend is not None and (not isinstance(backend, str) or backend not in ("auto", *BACKENDS)):
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")


@contextlib.contextmanager
def preferred_backend(backend: str | None):
    """Inside the block, block-sparse calls given no backend run `backend` (None / "auto": the fastest)."""
    check_backend_name(backend)
    token = _PREFERRED.set(None if backend == "auto" else backend)
    try:
        yield
    finally:
        _PREFERRED.reset(token)


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend `block_sparse_attention` runs: the one asked for, or the fastest available.

    dtype is the accumulation dtype (float32 for half-precision inputs).
    Raises ValueError for an unknown name or one that cannot run on this device / dtype.
    """
    device = torch.device(device)
    cpu = device.type == "cpu"
    if backend is None:
        backend = _PREFERRED.get()
    if backend is None or backend == "auto":
        # on CPU the compiled C++ kernel measured faster than compiled flex (docs/results, issue #16)
        if device.type == "cuda" and dtype == torch.float32 and flex.compiled_available(device, dtype):
            return "flex"
        if cpu and dtype == torch.float32 and compiled.available():
            return "compiled"
        if cpu and mkl_batch.available(dtype):
            return "mkl"
        if cpu and _HAS_CPU_FLASH and dtype in (torch.float32, torch.float64):
            return "flash"
        return "matmul"
    check_backend_name(backend)
    if backend == "compiled" and not (cpu and dtype == torch.float32 and compiled.available()):
        raise ValueError(
            f"backend 'compiled' needs float32 on CPU and attnsieve's compiled kernel (x86-64 Linux, a C++ "
            f"compiler, torch with MKL); unavailable for {dtype} on {device}"
        )
    if backend == "mkl" and not (cpu and mkl_batch.available(dtype)):
        raise ValueError(f"backend 'mkl' needs a CPU tensor and torch with MKL; unavailable for {dtype} on {device}")
    if backend == "flash" and not (cpu and _HAS_CPU_FLASH and dtype in (torch.float32, torch.float64)):
        raise ValueError(f"backend 'flash' needs torch's CPU flash-attention op; unavailable for {dtype} on {device}")
    if backend == "flex" and not (dtype == torch.float32 and flex.compiled_available(device, dtype)):
        raise ValueError(
            f"backend 'flex' needs torch.compile'd FlexAttention (CUDA, or an x86 CPU with a C++ compiler) and "
            f"float32 or half-precision inputs; unavailable for {dtype} on {device}"
        )
    if backend == "flex-eager" and not flex.available():
        raise ValueError("backend 'flex-eager' needs torch's FlexAttention (torch >= 2.5)")
    return backend


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_grid(Tq: int, Tk: int, block_size: int) -> tuple[int, int, int]:
    """(first query block, number of query blocks, number of key blocks) of a Tq x Tk call."""
    first = (Tk - Tq) // block_size
    n_k = cdiv(Tk, block_size)
    return first, n_k - first, n_k


@dataclass
class BlockSupport:
    """Which key blocks each query block attends.

    blocks: int64 [B, Hs, NQ, K] key-block indices, -1 marks an unused slot. Hs is the number of
    query heads (one list per head) or any divisor of it that is a multiple of the KV heads
    (Hs = Hkv: the heads of a KV group share one list, and the kernel stacks their queries).
    Indices in a row must be distinct. NQ and the block grid follow `block_grid`.

    row_mask: optional bool [B, Hs, NQ, R, K] (R = H / Hs * block_size query rows of an item,
    head-major) restricting each query row to some of its item's slots. The kernel still computes
    every slot's scores for the whole item (they count as computed cells) but each row's softmax
    only covers its own slots; per-token selections (Quest) execute this way without leaking one
    row's choice into another row's output.

    tokens: optional int64 [B, Ht, NQ, M] key positions (-1 unused) attended by every query row of
    the query block in addition to its blocks (columns, stripes, single tokens). Ht divides the
    query heads and is a multiple of the KV heads (it need not equal Hs). `block_sparse_attention`
    runs the blocks only; `support_attention` runs both and merges them exactly.
    """

    blocks: torch.Tensor
    block_size: int
    row_mask: torch.Tensor | None = None
    tokens: torch.Tensor | None = None

    def __post_init__(self):
        if self.blocks.dim() != 4:
            raise ValueError(f"support blocks must be [B, Hs, NQ, K], got shape {tuple(self.blocks.shape)}")
        if not 1 <= self.block_size <= 4096:
            raise ValueError(f"block_size must be in [1, 4096], got {self.block_size}")
        if self.row_mask is not None and (
            self.row_mask.dim() != 5 or self.row_mask.shape[:3] != self.blocks.shape[:3]
            or self.row_mask.shape[4] != self.blocks.shape[3]
        ):
            raise ValueError(
                f"row_mask must be [B, Hs, NQ, R, K] matching blocks {tuple(self.blocks.shape)}, "
                f"got {tuple(self.row_mask.shape)}"
            )
        if self.tokens is not None and (
            self.tokens.dim() != 4 or self.tokens.shape[0] != self.blocks.shape[0]
            or self.tokens.shape[2] != self.blocks.shape[2]
        ):
            raise ValueError(
                f"tokens must be [B, Ht, NQ, M] matching blocks {tuple(self.blocks.shape)}, "
                f"got {tuple(self.tokens.shape)}"
            )

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_size: int, width: int | None = None) -> BlockSupport:
        """Build from a boolean block mask [B, Hs, NQ, NK] (True = attend that key block).

        `width`: the list length, max(1, most blocks in a row), when the caller knows it already (the
        mask's own count is a host read, a sync on a GPU).
        """
        k = max(1, int(mask.sum(-1).max())) if width is None else width
        nk = mask.shape[-1]
        idx = torch.arange(nk, device=mask.device).expand_as(mask)
        keyed = torch.where(mask, idx, torch.full_like(idx, -1))
        blocks = keyed.topk(k, dim=-1).values  # valid indices first, -1 padding last
        return cls(blocks, block_size)

    def to_mask(self, n_k: int) -> torch.Tensor:
        """Boolean block mask [B, Hs, NQ, n_k]; for tests and plots (support-sized, not T x T)."""
        b = self.blocks
        mask = torch.zeros(*b.shape[:3], n_k + 1, dtype=torch.bool, device=b.device)
        mask.scatter_(-1, torch.where(b >= 0, b, torch.full_like(b, n_k)), True)
        return mask[..., :n_k]

    def num_blocks(self) -> int:
        return int((self.blocks >= 0).sum())


@dataclass
class SparseResult:
    out: torch.Tensor  # [B, H, Tq, Dv]
    lse: torch.Tensor  # [B, H, Tq]
    cells: int  # query-key cells whose scores were computed (real queries and keys only)


def _chunk_end(counts: list[int], start: int, per_block: int, limit: int) -> int:
    """Largest end such that items [start, end) fit in `limit` elements (counts ascending)."""
    lo, hi = start + 1, len(counts)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if (mid - start) * counts[mid - 1] * per_block <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    support: BlockSupport,
    *,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    backend: str | None = None,
) -> SparseResult:
    """Exact attention of q over the key blocks of `support`, with token-level masks.

    q: [B, H, Tq, D]; k: [B, Hkv, Tk, D]; v: [B, Hkv, Tk, Dv]; key_valid: [B, Tk] bool or None.
    Extra memory is O(T * D) for the block-aligned copies plus one chunk of at most
    `chunk_elems` elements; no Tq x Tk tensor is ever allocated.

    `backend` is "compiled", "mkl", "flash", "matmul", "flex" or "flex-eager" (see the module docstring);
    None or "auto" picks the fastest available (`resolve_backend`). All are exact; the tests run every one
    available.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    bs = support.block_size
    first_qb, n_q, n_k = block_grid(Tq, Tk, bs)
    blocks = support.blocks
    Hs = blocks.shape[1]
    if blocks.shape[0] != B or blocks.shape[2] != n_q:
        raise ValueError(
            f"support shape {tuple(blocks.shape)} does not match B={B} and {n_q} query blocks "
            f"(Tq={Tq}, Tk={Tk}, block_size={bs})"
        )
    if H % Hs or Hs % Hkv:
        raise ValueError(f"support heads ({Hs}) must divide query heads ({H}) and be a multiple of {Hkv}")
    if causal and Tq > Tk:
        raise ValueError(f"causal attention needs Tq <= Tk, got Tq={Tq}, Tk={Tk}")
    Gs = H // Hs  # query heads stacked into one support item
    R = Gs * bs  # query rows of one item
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    dev = q.device
    backend = resolve_backend(backend, dev, acc)
    if backend in ("flex", "flex-eager"):
        return flex.flex_support_attention(q, k, v, support, causal=causal, window=window, scale=scale,
                                           key_valid=key_valid, compiled=backend == "flex")
    fused = backend == "flash"
    use_mkl = backend == "mkl"

    # Block-aligned copies: queries on the grid, keys/values padded to whole blocks.
    lead = (Tk - Tq) - first_qb * bs
    if lead == 0 and n_q * bs == Tq:  # the queries fill the grid exactly: no padded copy
        qp = q
    else:
        qp = q.new_empty(B, H, n_q * bs, D)  # only the grid's padding rows need zeros
        qp[:, :, :lead] = 0
        qp[:, :, lead + Tq :] = 0
        qp[:, :, lead : lead + Tq] = q
    q_items = qp.reshape(B, Hs, Gs, n_q, bs, D).transpose(2, 3).reshape(B * Hs * n_q, R, D)  # [N, R, D]
    pad = n_k * bs - Tk
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad)) if pad else k
    vp = torch.nn.functional.pad(v, (0, 0, 0, pad)) if pad else v
    k_blocks = kp.reshape(B * Hkv * n_k, bs, D)  # [B*Hkv*NK, bs, D]
    v_blocks = vp.reshape(B * Hkv * n_k, bs, Dv)
    valid = torch.zeros(B, n_k * bs, dtype=torch.bool, device=dev)
    valid[:, :Tk] = True if key_valid is None else key_valid.to(dev, torch.bool)
    q_valid_pos = valid.clone()
    q_valid_pos[:, : Tk - Tq] = False  # grid positions before the first query are not queries

    sorted_blocks, perm = blocks.sort(dim=-1, descending=True)  # valid slots first
    if (
        backend != "matmul" and _HAS_CPU_FLASH and causal and window is None and key_valid is None and Tq == Tk
        and support.row_mask is None
    ):
        # A support holding every causal block is plain causal attention: run the fused kernel on
        # the whole sequence (no gathers), the same work SDPA does.
        want = torch.arange(n_q, device=dev)[:, None] - torch.arange(sorted_blocks.shape[-1], device=dev)
        # (torch's fused op leaves a row finite when its only keys are NaN; the other paths give NaN
        # as the reference does, so non-finite inputs take them)
        if (sorted_blocks.shape[-1] >= n_q and bool((sorted_blocks == torch.where(want >= 0, want, -1)).all())
                and bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all())):
            fd = q.dtype if q.dtype in (torch.bfloat16, torch.float32, torch.float64) else acc  # bf16 natively
            kr = k.repeat_interleave(H // Hkv, dim=1).to(fd) if H != Hkv else k.to(fd)
            vr = v.repeat_interleave(H // Hkv, dim=1).to(fd) if H != Hkv else v.to(fd)
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q.to(fd), kr, vr, 0.0, True, scale=scale
            )
            return SparseResult(o.to(q.dtype), l, H * B * exact_cells(Tq, Tk))
    if backend == "compiled":
        return _compiled_attention(
            q_items, k_blocks, v_blocks, support, valid, q_valid_pos, B, H, Hkv, Tq, Tk, first_qb, n_q, n_k,
            lead, causal, window, scale, q.dtype,
        )
    sorted_blocks = sorted_blocks.reshape(B * Hs * n_q, -1)
    row_mask = None
    if support.row_mask is not None:
        if support.row_mask.shape[3] != R:
            raise ValueError(f"row_mask has {support.row_mask.shape[3]} rows per item, expected {R}")
        row_mask = torch.gather(support.row_mask, 4, perm[:, :, :, None, :].expand_as(support.row_mask))
        row_mask = row_mask.reshape(B * Hs * n_q, R, -1)
    counts = (sorted_blocks >= 0).sum(-1)
    order = torch.argsort(counts, stable=True)
    counts_sorted = counts[order].tolist()
    kv_of_s = torch.arange(Hs, device=dev) * Hkv // Hs
    row_off = torch.arange(R, device=dev) % bs
    col_off = torch.arange(bs, device=dev)
    # Token masks are needed only where blocks are partial: the diagonal block (causal), the
    # window's edge, padding keys, padding queries and the keys past Tk in the last block.
    # Without a window, full off-diagonal blocks need no per-token mask at all.
    banded = window is not None
    padded_keys = key_valid is not None and not bool(valid[:, :Tk].all())
    ragged_end = Tk % bs != 0
    tile = col_off[None, :] > col_off[:, None]  # [bs, bs]: key after query inside a diagonal block
    zero, ninf = torch.zeros((), dtype=acc, device=dev), torch.full((), float("-inf"), dtype=acc, device=dev)
    if not banded:
        # Computed cells per (row, key block), counted from prefix sums instead of token masks.
        real_keys = valid.view(B, n_k, bs).sum(-1)  # [B, NK]
        q_real = q_valid_pos.view(B, n_k, bs)[:, first_qb:]  # [B, NQ, bs]
        rows_real = q_real.sum(-1) * Gs  # [B, NQ] real query rows of an item
        kv_blk = valid.view(B, n_k, bs)[:, first_qb:]
        diag_cells = ((kv_blk.cumsum(-1) * q_real).sum(-1) if causal else q_real.sum(-1) * kv_blk.sum(-1)) * Gs

    N = B * Hs * n_q
    out_items = torch.zeros(N, R, Dv, dtype=acc, device=dev)
    lse_items = torch.full((N, R), float("-inf"), dtype=acc, device=dev)
    cells = torch.zeros((), dtype=torch.int64, device=dev)
    per_block = bs * (R + D + Dv)
    if use_mkl:  # products read q, k, v in place: contiguous copies in the accumulation dtype
        qa = q_items.to(acc).contiguous()
        ka = k_blocks.to(acc).contiguous()
        va = v_blocks.to(acc).contiguous()
        per_block = 2 * bs * R  # scores and probabilities
        chunk_elems = min(chunk_elems, MKL_CHUNK_ELEMS)
    start = next((i for i, c in enumerate(counts_sorted) if c > 0), N)
    while start < N:
        end = _chunk_end(counts_sorted, start, per_block, chunk_elems)
        kc = counts_sorted[end - 1]
        idx = order[start:end]
        n = end - start
        blk = sorted_blocks[idx, :kc]  # [n, Kc]
        slot_ok = blk >= 0
        blk = blk.clamp_min(0)
        b_i = idx // (Hs * n_q)
        s_i = (idx // n_q) % Hs
        j_i = idx % n_q
        flat = ((b_i * Hkv + kv_of_s[s_i]) * n_k)[:, None] + blk  # [n, Kc]
        if banded:
            k_pos = (blk[:, :, None] * bs + col_off).reshape(n, kc * bs)  # [n, Kc*bs]
            q_pos = ((first_qb + j_i) * bs)[:, None] + row_off  # [n, R]
            col_ok = slot_ok.repeat_interleave(bs, dim=1) & valid[b_i[:, None], k_pos]
            allowed = col_ok[:, None, :] & q_valid_pos[b_i[:, None], q_pos][:, :, None]
            diff = (q_pos[:, :, None] - k_pos[:, None, :]).to(torch.int32)
            allowed &= diff < window
            if causal:
                allowed &= diff >= 0
            del diff
            cells += allowed.sum()  # every in-mask cell of the gathered tiles is computed
            if row_mask is not None:
                allowed.view(n, R, kc, bs).logical_and_(row_mask[idx, :, :kc, None])
            empty = ~allowed.any(-1)  # [n, R]
            live = allowed.view(n, R, kc, bs).any(3).any(1)  # [n, Kc] slots with any allowed cell
        else:
            qb = (first_qb + j_i)[:, None]  # [n, 1] grid index of each item's query block
            alive = slot_ok & (real_keys[b_i[:, None], blk] > 0)
            if causal:
                alive &= blk <= qb
            diag = alive & (blk == qb) if causal else torch.zeros_like(alive)
            cells += (rows_real[b_i, j_i][:, None] * real_keys[b_i[:, None], blk] * (alive & ~diag)).sum()
            cells += (diag_cells[b_i, j_i][:, None] * diag).sum()
            ok = alive[:, None, :, None]  # [n, 1, Kc, 1] -> [n, R, Kc, bs] by broadcasting
            row_alive = alive[:, None, :]
            if row_mask is not None:
                ok = ok & row_mask[idx, :, :kc, None]
                row_alive = row_alive & row_mask[idx, :, :kc]
            if padded_keys or ragged_end:
                ok = ok & valid.view(B, n_k, bs)[b_i[:, None], blk][:, None]
            empty = (~row_alive.any(-1)).expand(n, R)  # [n, R]
            if padded_keys:
                q_ok = q_valid_pos.view(B, n_k, bs)[b_i, first_qb + j_i][:, row_off]  # [n, R]
                ok = ok & q_ok[:, :, None, None]
                empty = empty | ~q_ok
            live = alive
            diag_items = None
            if causal and bool(diag.any()):
                # the diagonal slot (at most one per item): no key after the query inside its tile
                has, pos = diag.any(-1), diag.to(torch.int8).argmax(-1)
                diag_items = torch.nonzero(has).squeeze(-1)
                diag_pos = pos[diag_items]
            if not use_mkl:
                allowed = ok.expand(n, R, kc, bs).clone()
                if diag_items is not None:
                    allowed[diag_items, :, diag_pos] &= ~tile[row_off][None]
                allowed = allowed.view(n, R, kc * bs)
        if use_mkl:
            scores = torch.empty(n, R, kc * bs, dtype=acc, device=dev)
            it, sl = torch.nonzero(live, as_tuple=True)  # computed (item, slot) products
            mkl_batch.gemm_batch(
                qa, idx[it] * (R * D), D, ka, flat[it, sl] * (bs * D), D,
                scores, it * (R * kc * bs) + sl * bs, kc * bs, R, bs, D, trans_b=True, alpha=scale,
            )
            if banded:
                scores.masked_fill_(~allowed, float("-inf"))
            else:
                sv = scores.view(n, R, kc, bs)
                sv.masked_fill_(~ok, float("-inf"))
                if diag_items is not None:
                    tiles = sv[diag_items, :, diag_pos]
                    sv[diag_items, :, diag_pos] = tiles.masked_fill(tile[row_off][None], float("-inf"))
            m = scores.amax(-1)  # NaN where a row has a NaN score, -inf where every score is -inf
            p = torch.softmax(scores, -1)
            del scores
            l = m - torch.log(p.amax(-1))  # the row's largest probability is exp(0) / sum
            none = m == float("-inf")  # no finite score (keys at -inf): weights 0, as in the reference
            p.masked_fill_(none[..., None], 0.0)
            l.masked_fill_(none, float("-inf"))
            o = torch.zeros(n, R, Dv, dtype=acc, device=dev)
            sl, it = torch.nonzero(live.t(), as_tuple=True)  # products grouped by slot
            per_slot = live.sum(0).tolist()
            done = 0
            for s_idx, cnt in enumerate(per_slot):
                # one call per slot: products of one call write distinct outputs
                if cnt:
                    i_s = it[done : done + cnt]
                    mkl_batch.gemm_batch(
                        p, i_s * (R * kc * bs) + s_idx * bs, kc * bs, va, flat[i_s, s_idx] * (bs * Dv), Dv,
                        o, i_s * (R * Dv), Dv, R, Dv, bs, trans_b=False, beta=1.0,
                    )
                done += cnt
            del p
            l = l.masked_fill(empty, float("-inf"))
            o = o.masked_fill(empty[..., None], 0.0)
            out_items[idx] = o
            lse_items[idx] = l
            start = end
            continue
        kg = k_blocks.index_select(0, flat.reshape(-1)).view(n, kc * bs, D).to(acc)
        vg = v_blocks.index_select(0, flat.reshape(-1)).view(n, kc * bs, Dv).to(acc)
        qi = q_items[idx].to(acc)
        # torch's fused op adds the mask as a bias, so a NaN key would reach masked rows (NaN - inf
        # is NaN): chunks with non-finite queries or keys take the masked matmul path instead
        if fused and bool(torch.isfinite(kg).all()) and bool(torch.isfinite(qi).all()):
            bias = torch.where(allowed, zero, ninf)[:, None]  # [n, 1, R, Kc*bs]
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qi[:, None], kg[:, None], vg[:, None], 0.0, False, attn_mask=bias, scale=scale
            )
            o, l = o[:, 0], l[:, 0].masked_fill(empty, float("-inf"))
            o = o.masked_fill(empty[..., None], 0.0)
        else:
            scores = torch.bmm(qi, kg.transpose(1, 2)).mul_(scale)  # [n, R, Kc*bs]
            scores.masked_fill_(~allowed, float("-inf"))
            o, l = softmax_with_lse(scores, vg)
        out_items[idx] = o
        lse_items[idx] = l
        start = end

    out = out_items.view(B, Hs, n_q, Gs, bs, Dv).transpose(2, 3).reshape(B, H, n_q * bs, Dv)
    lse = lse_items.view(B, Hs, n_q, Gs, bs).transpose(2, 3).reshape(B, H, n_q * bs)
    out = out[:, :, lead : lead + Tq].to(q.dtype)
    return SparseResult(out, lse[:, :, lead : lead + Tq], int(cells))


def _compiled_attention(q_items, k_blocks, v_blocks, support, valid, q_valid_pos, B, H, Hkv, Tq, Tk, first_qb, n_q,
                        n_k, lead, causal, window, scale, out_dtype) -> SparseResult:
    """Run the whole support through the compiled kernel: every item's slots in place, one call."""
    bs = support.block_size
    blocks = support.blocks
    Hs = blocks.shape[1]
    Gs, R = H // Hs, H // Hs * bs
    N, K = B * Hs * n_q, blocks.shape[-1]
    dev = q_items.device
    kv_of_s = torch.arange(Hs, device=dev) * Hkv // Hs
    base = ((torch.arange(B, device=dev)[:, None] * Hkv + kv_of_s[None]) * n_k)[:, :, None, None]  # [B, Hs, 1, 1]
    slots = torch.where(blocks >= 0, base + blocks, -1).reshape(N, K).contiguous()
    kpos = (blocks.clamp_min(0) * bs).reshape(N, K).contiguous()
    qpos = ((first_qb + torch.arange(n_q, device=dev)) * bs).repeat(B * Hs).contiguous()
    empty = torch.empty(0, dtype=torch.bool, device=dev)
    kv_valid = valid.view(B, 1, n_k, bs)
    key_ok = empty if bool(kv_valid.all()) else kv_valid.expand(B, Hkv, n_k, bs).reshape(-1, bs).contiguous()
    q_real = q_valid_pos.view(B, n_k, bs)[:, first_qb:]  # [B, NQ, bs]
    q_ok = empty
    if not bool(q_real.all()):
        q_ok = q_real[:, None, :, None, :].expand(B, Hs, n_q, Gs, bs).reshape(N, R).contiguous()
    row_mask = empty if support.row_mask is None else support.row_mask.reshape(N, R, K).contiguous()
    cd = compiled.native_dtype(q_items.dtype, bs, q_items.shape[-1], v_blocks.shape[-1])
    Dv = v_blocks.shape[-1]
    # the kernel writes normalised rows straight into [B, H, Tq, Dv] in its compute dtype
    out = torch.empty(B, H, Tq, Dv, dtype=cd, device=dev)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=dev)
    cells = compiled.module().block_sparse_forward(
        q_items.to(cd).contiguous(), k_blocks.to(cd).contiguous(), v_blocks.to(cd).contiguous(),
        slots, kpos, qpos, row_mask, key_ok, q_ok, bs, causal, -1 if window is None else int(window), float(scale),
        out, lse, Hs, lead,
    )
    return SparseResult(out.to(out_dtype), lse, int(cells))

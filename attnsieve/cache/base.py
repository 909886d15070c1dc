"""The pure-tensor side of KV-cache compression: one layer's stored past, and the policy contract.

A `LayerKV` holds one attention layer's past for every batch row and KV head as separate rows of
real tensors (keys, values and the tokens' true positions), so rows may hold different numbers of
tokens (per-head budgets, left padding) without padding or masking in memory: `nbytes()` is what
the cache really holds. A row grows in place: it is a view of a buffer with a little headroom (at
most 1/16 of the row plus 4 tokens, counted by `nbytes()`), so a decoding step writes its token
instead of copying the row, and dropping a row's oldest tokens (a sliding window) moves the view.
Each call of the layer (prefill, a prefill chunk, or one decoding step) goes through `attend`:
attention of the new queries over the stored past (`attend_past`, which a policy may override:
quantised keys, pruned channels, page selection) merged through the log-sum-exp with attention over
the new tokens themselves (the layer's prefill method), then `absorb` stores the new tokens and
lets the policy `compress`.

A policy is a `KVPolicy` subclass registered with `@register_policy`; it builds one `LayerKV`
per layer. Sliding-window layers get a `WindowKV` that keeps exactly the layer's window (as
transformers' own sliding cache does) and are never compressed by a policy.
Nothing here imports transformers; integrations/hf_cache.py adapts it to transformers' Cache.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from attnsieve.kernels import BlockSupport, block_grid, block_sparse_attention, merge, softmax_with_lse
from attnsieve.params import enforce_types

_PAST_BLOCK = 64  # key block of the block kernel when a continuation reads the whole stored past


@dataclass
class Rotary:
    """How a call's queries and keys were rotated (RoPE in transformers' rotate-half layout).

    The integration sets it on the layer before each call, for policies that reason about
    positions (Expected Attention projects query statistics to future positions). Dims i and
    i + R/2 of the first R = 2 * len(inv_freq) dims of a head turn together at inv_freq[i] * position;
    the remaining dims are not rotated.
    """

    inv_freq: torch.Tensor  # [R/2] angular frequencies
    positions: torch.Tensor  # [B, Tq] position ids the call's tokens were rotated with


@dataclass
class PastAttention:
    out: torch.Tensor  # [B, H, Tq, Dv]
    lse: torch.Tensor  # [B, H, Tq]
    cells: int  # query-key cells computed against the stored past


class LayerKV:
    """One layer's stored past: rows b * Hkv + h, each with keys [L, D], values [L, Dv], pos [L]."""

    def __init__(self, layer_idx: int, window: int | None = None):
        self.layer_idx = layer_idx
        self.window = window  # the layer's native sliding window (None: global layer)
        self.seen = 0  # tokens seen (padding included): the next token's position
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.pos: list[torch.Tensor] = []  # int32 true positions of the stored tokens
        self.B = self.Hkv = 0
        self.valid_seen: torch.Tensor | None = None  # [B] real tokens seen per batch row
        self.valid_host: list[int] = []  # the same counts on the host: budgets read them without a GPU sync
        # per row: (key buffer, value buffer, position buffer, offset) when the row is a view of
        # buffers with headroom that appends write into; None when the row is a tensor of its own
        self._bufs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None] = []
        # (keys [N, cap, D], values [N, cap, Dv], positions [N, cap]) when decoding steps append to
        # every row at once: row r's buffer is then row r of these, so that a step writes one column
        # and attention reads every row as one view (no stacking); None otherwise
        self._shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.rotary: Rotary | None = None  # this call's RoPE, set by the integration (None: unknown or no RoPE)
        # True once the context is compressed in query-agnostic mode (PolicyCache.freeze): later tokens
        # (questions, answers) are stored as they come and the policy compresses nothing more
        self.frozen = False
        # Set (to the policy's per-row spans) while a policy replays text over the cache to score it
        # (KVzip's reconstruction passes): calls attend as usual but store nothing, and `probe` scores
        self.probing: Any = None

    # ----- storage -------------------------------------------------------------------------
    def _init(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.B, self.Hkv = k.shape[0], k.shape[1]
        n = self.B * self.Hkv
        self.keys = [k.new_zeros(0, k.shape[-1]) for _ in range(n)]
        self.values = [v.new_zeros(0, v.shape[-1]) for _ in range(n)]
        self.pos = [torch.zeros(0, dtype=torch.int32, device=k.device) for _ in range(n)]
        self.valid_seen = torch.zeros(self.B, dtype=torch.long, device=k.device)
        self.valid_host = [0] * self.B
        self._bufs = [None] * n

    def nbytes(self) -> int:
        """Bytes of every tensor this layer keeps for its past (keys, values, positions, metadata);
        a row that grows in a buffer counts the whole buffer, headroom included."""
        total = sum(t.numel() * t.element_size() for t in self._held())
        for r in range(len(self._bufs)):
            if self._tracked(r):
                kb, vb, pb, _ = self._bufs[r]
                total += sum(t.numel() * t.element_size() for t in (kb, vb, pb))
                total -= sum(t.numel() * t.element_size() for t in (self.keys[r], self.values[r], self.pos[r]))
        return total

    def _drop_stale_buffers(self) -> None:
        """Release what no row uses: the buffers of rows that no longer view them (a policy replaced
        the row), and the rest of a larger tensor a row is a slice of (a quantiser's full-precision
        tail cut from the prompt), so replaced tokens are freed, not merely left uncounted."""
        if self._shared is not None and self._shared_length() is None:  # a row left the batch buffer
            self._shared = None
            for r in range(len(self._bufs)):  # the others take buffers of their own: the batch one is freed
                if self._tracked(r):
                    kb, vb, pb, off = self._bufs[r]
                    n = self.keys[r].shape[0]
                    self._bufs[r] = (kb.clone(), vb.clone(), pb.clone(), off)
                    kb, vb, pb, _ = self._bufs[r]
                    self.keys[r], self.values[r], self.pos[r] = kb[off : off + n], vb[off : off + n], pb[off : off + n]
        for r in range(len(self.keys)):
            if r < len(self._bufs) and self._bufs[r] is not None:
                if self._tracked(r):
                    continue
                self._bufs[r] = None
            for rows in (self.keys, self.values, self.pos):
                t = rows[r]
                if t.untyped_storage().nbytes() > t.numel() * t.element_size():
                    rows[r] = t.clone()

    def _tracked(self, r: int) -> bool:
        """Whether row r is still the view of its buffers that `_append` made (a policy may have
        replaced the row with a tensor of its own since)."""
        if r >= len(self._bufs) or self._bufs[r] is None:
            return False
        kb, vb, pb, off = self._bufs[r]
        n = self.keys[r].shape[0]
        if n == 0 or off + n > kb.shape[0] or self.values[r].shape[0] != n or self.pos[r].shape[0] != n:
            return False
        return (self.keys[r].data_ptr() == kb[off].data_ptr() and self.values[r].data_ptr() == vb[off].data_ptr()
                and self.pos[r].data_ptr() == pb[off].data_ptr())

    def _append(self, r: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Append t tokens to row r: written into the row's buffer headroom when there is room, else the
        row moves into new buffers with headroom (amortised: a copy every ~n/16, at least 4, appended tokens)."""
        t = k.shape[0]
        if t == 0:
            return
        n = self.keys[r].shape[0]
        if self._tracked(r):
            kb, vb, pb, off = self._bufs[r]
            if off + n + t <= kb.shape[0]:
                end = off + n + t
                kb[off + n : end] = k
                vb[off + n : end] = v
                pb[off + n : end] = pos
                self.keys[r], self.values[r], self.pos[r] = kb[off:end], vb[off:end], pb[off:end]
                return
        cap = n + t + (max(4, (n + t) // 16) if n else 0)  # a prompt is stored exactly; growth gets headroom
        old_k, old_v, old_p = self.keys[r], self.values[r], self.pos[r]
        kb = old_k.new_empty(cap, old_k.shape[-1])
        vb = old_v.new_empty(cap, old_v.shape[-1])
        pb = old_p.new_empty(cap)
        for buf, old, new in ((kb, old_k, k), (vb, old_v, v), (pb, old_p, pos)):
            buf[:n] = old
            buf[n : n + t] = new
        self._bufs[r] = (kb, vb, pb, 0)
        self.keys[r], self.values[r], self.pos[r] = kb[: n + t], vb[: n + t], pb[: n + t]

    def _shared_length(self) -> int | None:
        """The common length of the rows when every row is the view `_append_all` made of its row of the
        batch buffer, at one offset; None otherwise."""
        if self._shared is None or not self._bufs or self._bufs[0] is None:
            return None
        K = self._shared[0]
        n, off = self.keys[0].shape[0], self._bufs[0][3]
        for r in range(len(self.keys)):
            b = self._bufs[r]
            if (b is None or b[3] != off or self.keys[r].shape[0] != n or b[0].data_ptr() != K[r].data_ptr()
                    or not self._tracked(r)):
                return None
        return n

    def _append_all(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Append one token to every row (k [N, D], v [N, Dv], pos [1]) where the rows are equally long:
        a column written into the batch buffer's headroom, else every row moved into a new batch buffer
        with headroom (amortised as `_append`); rows of different lengths append one by one."""
        N = len(self.keys)
        n = self._shared_length()
        if n is not None and self._bufs[0][3] + n < self._shared[0].shape[1]:
            K, V, P = self._shared
            off = self._bufs[0][3]
            K[:, off + n], V[:, off + n], P[:, off + n] = k, v, pos
            for r in range(N):
                self.keys[r], self.values[r], self.pos[r] = K[r, off : off + n + 1], V[r, off : off + n + 1], \
                    P[r, off : off + n + 1]
            return
        n = self.keys[0].shape[0]
        if any(t.shape[0] != n for t in self.keys):
            for r in range(N):
                self._append(r, k[r : r + 1], v[r : r + 1], pos)
            return
        cap = n + 1 + max(4, (n + 1) // 16)
        K, V = k.new_empty(N, cap, k.shape[-1]), v.new_empty(N, cap, v.shape[-1])
        P = pos.new_empty(N, cap)
        for r in range(N if n else 0):  # once per reallocation (every ~n/16 steps)
            K[r, :n], V[r, :n], P[r, :n] = self.keys[r], self.values[r], self.pos[r]
        K[:, n], V[:, n], P[:, n] = k, v, pos
        self._shared = (K, V, P)
        for r in range(N):
            self._bufs[r] = (K[r], V[r], P[r], 0)
            self.keys[r], self.values[r], self.pos[r] = K[r, : n + 1], V[r, : n + 1], P[r, : n + 1]

    def _held(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values, *self.pos]

    def dense_nbytes(self) -> int:
        """Bytes transformers' DynamicCache would hold for this layer now (keys and values, padding included)."""
        if not self.keys:
            return 0
        per_token = self.keys[0].shape[-1] * self.keys[0].element_size() + self.values[0].shape[-1] * (
            self.values[0].element_size()
        )
        tokens = self.seen if self.window is None else min(self.seen, self.window - 1)
        return self.B * self.Hkv * tokens * per_token

    def stored_tokens(self) -> torch.Tensor:
        """[B, Hkv] tokens stored per row."""
        return torch.tensor([p.numel() for p in self.pos]).view(self.B, self.Hkv)

    def row_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows padded to one batch (a transient view for computing): k, v, pos, valid [N, Lmax].

        Read-only: with one row these are views of the stored row itself."""
        if len(self.pos) == 1:  # one row (batch 1, one KV head): views, no copy
            p = self.pos[0]
            return self.keys[0][None], self.values[0][None], p[None], torch.ones(1, p.numel(), dtype=torch.bool,
                                                                                   device=p.device)
        n = self._shared_length()
        if n is not None:  # every row a view of the batch buffer at one offset: one view, no copy
            off = self._bufs[0][3]
            K, V, P = self._shared
            k, v, pos = K[:, off : off + n], V[:, off : off + n], P[:, off : off + n]
            return k, v, pos, torch.ones(pos.shape, dtype=torch.bool, device=pos.device)
        lengths = [p.numel() for p in self.pos]
        if len(set(lengths)) == 1:  # equal rows: stack, no padding
            k, v, pos = torch.stack(self.keys), torch.stack(self.values), torch.stack(self.pos)
            return k, v, pos, torch.ones(pos.shape, dtype=torch.bool, device=pos.device)
        pad = torch.nn.utils.rnn.pad_sequence
        k, v = pad(self.keys, batch_first=True), pad(self.values, batch_first=True)
        pos = pad(self.pos, batch_first=True, padding_value=-1)
        valid = torch.arange(pos.shape[1], device=pos.device)[None] < torch.tensor(lengths, device=pos.device)[:, None]
        return k, v, pos, valid

    # ----- attention ---------------------------------------------------------------------
    def attend(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        new_valid: torch.Tensor | None,
        scale: float,
        new_attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any],
    ):
        """Attention of q [B, H, Tq, D] over (stored past + the Tq new tokens); stores the new tokens.

        `new_attention(q, k_new, v_new)` runs the layer's own method on the new tokens (causal,
        queries and keys aligned) and returns an object with out, lse, cells. Returns
        (out [B, H, Tq, Dv], cells).
        """
        if not self.keys:
            self._init(k_new, v_new)
        if self.probing is not None:
            return self._probe_call(q, k_new, v_new, new_valid, scale, new_attention)
        if q.shape[2] == 1 and new_valid is None and self.seen > 0 and self._plain_decode():
            return self._decode_step(q, k_new, v_new, scale)
        out, cells = self._new_and_past(q, k_new, v_new, new_valid, scale, new_attention)
        self.absorb(q, k_new, v_new, new_valid, scale)
        return out, cells

    def _new_and_past(self, q, k_new, v_new, new_valid, scale, new_attention):
        """The new tokens' attention over themselves merged through the lse with attention over the past."""
        new = new_attention(q, k_new, v_new)
        out, cells = new.out, new.cells
        if self.seen > 0:
            past = self.attend_past(q, scale, new_valid)
            if past is not None:
                out, _ = merge(past.out, past.lse, new.out, new.lse)
                cells += past.cells
        return out, cells

    def _probe_call(self, q, k_new, v_new, new_valid, scale, new_attention):
        """A replay call: the same attention as `attend`, then `probe` instead of storing the tokens."""
        out, cells = self._new_and_past(q, k_new, v_new, new_valid, scale, new_attention)
        self.probe(q, k_new, new_valid, scale)
        return out, cells

    def probe(self, q, k_new, new_valid, scale) -> None:
        """Hook: score the stored tokens from a replay call's queries and keys (nothing is stored)."""

    def _plain_decode(self) -> bool:
        """Whether a one-token step may take the fused path: the past is read as stored (the policy
        does not override `attend_past`), every row holds as many tokens, and every stored token is
        inside the new query's window."""
        if type(self).attend_past is not LayerKV.attend_past or len({p.numel() for p in self.pos}) != 1:
            return False
        return self.window is None or all(first > self.seen - self.window for first in self._first_positions())

    def _first_positions(self) -> list[int]:
        """Each non-empty row's oldest stored position (one read of the device for all rows)."""
        firsts = [p[:1] for p in self.pos if p.numel()]
        return torch.cat(firsts).tolist() if firsts else []

    def _note_positions(self, r: int, positions) -> None:
        """Hook: the host-side positions just appended to row r (a window layer tracks them)."""

    def _decode_step(self, q, k_new, v_new, scale):
        """One decoding step without padding: store the token, then one attention call over every stored
        row (the token itself included: one query over one key is exact under any method), then let
        the policy compress. The same cells as the general path, in one call instead of attention
        over the past and over the new token merged through the log-sum-exp."""
        B, H, _, D = q.shape
        pos = self.query_positions(1, q.device).to(torch.int32)
        self._append_all(k_new.reshape(B * self.Hkv, D), v_new.reshape(B * self.Hkv, -1), pos)
        for r in range(B * self.Hkv):
            self._note_positions(r, (self.seen,))
        self.valid_seen += 1
        self.valid_host = [n + 1 for n in self.valid_host]
        self.seen += 1
        k, v, _, _ = self.row_tensors()
        L = k.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k.view(B, self.Hkv, L, D), v.view(B, self.Hkv, L, -1), scale=scale, enable_gqa=H != self.Hkv
        )
        if not self.frozen:
            self.compress(q, k_new, None, scale)
        self._drop_stale_buffers()
        return out, B * H * L

    def query_positions(self, Tq: int, device) -> torch.Tensor:
        return torch.arange(self.seen, self.seen + Tq, device=device)

    def attend_past(self, q: torch.Tensor, scale: float, new_valid: torch.Tensor | None) -> PastAttention | None:
        """Exact attention of the new queries over every stored token (window-limited on sliding layers)."""
        k, v, pos, valid = self.row_tensors()
        return self._attend_rows(q, k, v, pos, valid, scale, new_valid)

    def _attend_rows(self, q, k, v, pos, valid, scale, new_valid) -> PastAttention | None:
        B, H, Tq, D = q.shape
        Hkv = self.Hkv
        G = H // Hkv
        if k.shape[1] == 0:
            return None
        L = k.shape[1]
        if self.window is None and new_valid is None and 1 < Tq <= L and bool(valid.all()):
            # every new query sees every stored token (a continuation of a global layer: a question, a
            # prefill chunk, a replay): the block kernel over all key blocks, non-causal, with its lse
            first, n_q, n_k = block_grid(Tq, L, _PAST_BLOCK)
            blocks = torch.arange(n_k, device=q.device).expand(B, Hkv, n_q, n_k).contiguous()
            res = block_sparse_attention(q, k.view(B, Hkv, L, D), v.view(B, Hkv, L, -1),
                                         BlockSupport(blocks, _PAST_BLOCK), causal=False, scale=scale)
            return PastAttention(res.out, res.lse, res.cells)
        acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        qi = q.reshape(B * Hkv, G * Tq, D).to(acc)  # rows of one KV head: its G query heads x Tq
        scores = torch.bmm(qi, k.to(acc).transpose(1, 2)).mul_(scale)  # [N, G*Tq, L]
        allowed = valid[:, None, :].expand(-1, G * Tq, -1)
        if self.window is not None:
            q_pos = self.query_positions(Tq, q.device).repeat(G)  # [G*Tq]
            allowed = allowed & (q_pos[None, :, None] - pos[:, None, :].long() < self.window)
        if new_valid is not None:  # padding queries see nothing of the past
            qv = new_valid[:, None, :].expand(B, Hkv * G, Tq).reshape(B * Hkv, G * Tq)
            allowed = allowed & qv[:, :, None]
        scores.masked_fill_(~allowed, float("-inf"))
        o, lse = softmax_with_lse(scores, v.to(acc))
        out = o.view(B, Hkv, G, Tq, -1).reshape(B, H, Tq, -1).to(q.dtype)
        if new_valid is None and (self.window is None or (Tq == 1 and isinstance(self, WindowKV) and not self.frozen)):
            # every query sees every stored token (a window layer holds only what its next query sees):
            # the count from the rows' lengths, without reading the device
            cells = G * Tq * sum(p.numel() for p in self.pos)
        else:
            cells = int(allowed.sum())
        return PastAttention(out, lse.view(B, H, Tq), cells)

    # ----- storing -----------------------------------------------------------------------
    def absorb(self, q, k_new, v_new, new_valid, scale) -> None:
        """Append the new real tokens to every row, then let the policy compress."""
        B, Hkv, Tq, _ = k_new.shape
        pos = self.query_positions(Tq, k_new.device).to(torch.int32)
        # the padding mask read once per prompt or chunk (never per decoding step): host-side counts
        # and positions, so that budgets and windows need no GPU sync later
        host_valid = None if new_valid is None else new_valid.bool().cpu()
        for b in range(B):
            keep = slice(None) if new_valid is None else new_valid[b].bool()
            p_b = pos[keep]
            if host_valid is None:
                host_pos = range(self.seen, self.seen + Tq)
            else:
                host_pos = (torch.nonzero(host_valid[b]).flatten() + self.seen).tolist()
            for h in range(Hkv):
                self._append(b * Hkv + h, k_new[b, h][keep], v_new[b, h][keep], p_b)
                self._note_positions(b * Hkv + h, host_pos)
        if new_valid is None:
            self.valid_seen += Tq
            self.valid_host = [n + Tq for n in self.valid_host]
        else:
            self.valid_seen += new_valid.sum(-1)
            self.valid_host = [n + int(c) for n, c in zip(self.valid_host, host_valid.sum(-1).tolist(), strict=True)]
        self.seen += Tq
        if not self.frozen:
            self.compress(q, k_new, new_valid, scale)
        self._drop_stale_buffers()

    def compress(self, q, k_new, new_valid, scale) -> None:
        """Hook: reduce what is stored. The base class keeps everything (the dense cache)."""

    def keep_rows(self, keep: list[torch.Tensor]) -> None:
        """Keep, in every row r, the stored tokens at indices keep[r] (kept in position order), copied
        into tensors of their own, so the evicted ones are freed (no host read of the indices)."""
        for r, idx in enumerate(keep):
            idx = idx.sort().values
            self.keys[r] = self.keys[r].index_select(0, idx).contiguous()
            self.values[r] = self.values[r].index_select(0, idx).contiguous()
            self.pos[r] = self.pos[r].index_select(0, idx).contiguous()
            self._bufs[r] = None  # the old buffer (the evicted tokens) is freed with its last reference
        self._drop_stale_buffers()  # and a batch buffer no row uses any more

    def keep_suffix(self, r: int, m: int) -> None:
        """Keep row r's last m stored tokens (a window dropping its oldest ones). A buffered row's
        view moves forward without copying while the buffer's unused part stays within the headroom;
        otherwise the kept tokens are copied into tensors of their own, so the dropped ones are freed."""
        n = self.keys[r].shape[0]
        if m >= n:
            return
        if m and self._tracked(r) and self._bufs[r][0].shape[0] - m <= max(4, (m + 1) // 16) + 1:
            kb, vb, pb, off = self._bufs[r]
            a = off + n - m
            self._bufs[r] = (kb, vb, pb, a)
            self.keys[r], self.values[r], self.pos[r] = kb[a : a + m], vb[a : a + m], pb[a : a + m]
            return
        self.keys[r] = self.keys[r][n - m :].clone()
        self.values[r] = self.values[r][n - m :].clone()
        self.pos[r] = self.pos[r][n - m :].clone()
        if r < len(self._bufs):
            self._bufs[r] = None


class WindowKV(LayerKV):
    """A sliding-window layer's cache: exactly the tokens its window can still see (window - 1).

    The stored positions of every row are mirrored on the host (at most window - 1 of them), so a
    decoding step drops the oldest token without reading the device."""

    def __init__(self, layer_idx: int, window: int | None = None):
        super().__init__(layer_idx, window)
        self._host_pos: list[deque] = []

    def _note_positions(self, r: int, positions) -> None:
        while len(self._host_pos) <= r:
            self._host_pos.append(deque(maxlen=self.window - 1))  # older ones are out of every window
        self._host_pos[r].extend(positions)

    def _first_positions(self) -> list[int]:
        return [hp[0] for hp in self._host_pos if hp]

    def compress(self, q, k_new, new_valid, scale) -> None:
        horizon = self.seen - (self.window - 1)  # positions below this are out of every future window
        for r, hp in enumerate(self._host_pos):
            while hp and hp[0] < horizon:
                hp.popleft()
            self.keep_suffix(r, len(hp))  # stored positions ascend: the kept ones are the row's last


@dataclass
class KVPolicyParams:
    """Parameters every eviction policy shares; policies extend this dataclass (fields start with kv_)."""

    kv_sink: int = field(default=4, metadata={"help": "first tokens always kept (>= 0; Gemma-3 needs its first)"})
    kv_recent: int = field(default=0, metadata={"help": "most recent tokens always kept (>= 0)"})

    def __post_init__(self):
        if self.kv_sink < 0:
            raise ValueError(f"kv_sink must be >= 0, got {self.kv_sink}")
        if self.kv_recent < 0:
            raise ValueError(f"kv_recent must be >= 0, got {self.kv_recent}")


class KVPolicy:
    """A decoding-cache policy: builds each global layer's LayerKV. Registered with @register_policy."""

    name: ClassVar[str]
    kind: ClassVar[str]  # what kv_budget counts: "eviction" (tokens), "quantisation" (bytes), "channels",
    # "lowrank" (rank), "selection" (tokens read per step) or "heads" (KV heads kept whole)
    Params: ClassVar[type]
    summary: ClassVar[str]
    # True for policies that score the cache by running the model again over it after a prefill (KVzip's
    # context reconstruction): the integration then calls `replay_passes` and `finish_replay`
    replays: ClassVar[bool] = False

    def __init__(self, budget: float | None, params=None, *, n_layers: int = 1):
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, numbers.Real)):
            raise TypeError(f"kv_budget must be a number in (0, 1] or None, got {type(budget).__name__} {budget!r}")
        if budget is not None and not 0 < budget <= 1:
            raise ValueError(f"kv_budget must be in (0, 1], got {budget}")
        self.budget = 1.0 if budget is None else float(budget)
        self.budget_given = budget is not None
        self.params = self.Params() if params is None else params
        self.n_layers = n_layers

    def layer(self, layer_idx: int) -> LayerKV:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.name}(kv_budget={self.budget}, {self.params})"


def keep_count(valid_tokens: int, budget: float) -> int:
    """Tokens a row keeps under a token budget: ceil(budget * real tokens seen)."""
    return min(valid_tokens, max(1, math.ceil(budget * valid_tokens)))


def forced_mask(pos: torch.Tensor, seen: int, sink: int, recent: int) -> torch.Tensor:
    """[L] bool: the row's first `sink` real tokens and its `recent` latest positions."""
    rank = torch.arange(pos.numel(), device=pos.device)
    return (rank < sink) | (pos.long() >= seen - recent)


class EvictingKV(LayerKV):
    """A global layer that keeps, per row, its forced tokens plus its best-scoring others up to the budget.

    Subclasses provide `token_scores(q, k_new, new_valid, scale) -> list of [L] scores per row`
    (higher = keep) and may override `row_budgets` (per-head budgets) and when to compress.
    """

    def __init__(self, layer_idx: int, policy: KVPolicy, window: int | None = None):
        super().__init__(layer_idx, window)
        self.policy = policy
        self.p = policy.params

    def row_budgets(self) -> list[int]:
        """Tokens each row keeps: the policy's fraction of the row's real tokens seen."""
        return [
            keep_count(self.valid_host[r // self.Hkv], self.policy.budget) for r in range(len(self.pos))
        ]

    def should_compress(self, Tq: int) -> bool:
        return Tq > 1 or any(p.numel() > b for p, b in zip(self.pos, self.row_budgets(), strict=True))

    def scored_budgets(self, q, k_new, new_valid, scale) -> tuple[list[int], list[torch.Tensor]] | None:
        """(tokens each row keeps, token scores per row) when this call must evict, else None."""
        if self.policy.budget >= 1.0 or not self.should_compress(k_new.shape[2]):
            return None
        budgets = self.row_budgets()
        if all(p.numel() <= b for p, b in zip(self.pos, budgets, strict=True)):
            return None
        return budgets, self.token_scores(q, k_new, new_valid, scale)

    def compress(self, q, k_new, new_valid, scale) -> None:
        got = self.scored_budgets(q, k_new, new_valid, scale)
        if got is None:
            return
        budgets, scores = got
        keep = []
        for r, (p, s) in enumerate(zip(self.pos, scores, strict=True)):
            n = min(budgets[r], p.numel())
            forced = forced_mask(p, self.seen, self.p.kv_sink, self.p.kv_recent)
            # forced tokens outrank everything, a policy's own always-kept tokens (scored +inf) included,
            # so the first tokens survive a budget smaller than an observation window
            s = torch.where(forced, torch.inf, torch.where(s == torch.inf, torch.finfo(s.dtype).max, s))
            keep.append(torch.topk(s, n).indices)
        self.keep_rows(keep)
        self.after_keep(keep)

    def after_keep(self, keep: list[torch.Tensor]) -> None:
        """Hook: keep per-token policy state (accumulated scores) aligned with the stored tokens."""

    def token_scores(self, q, k_new, new_valid, scale) -> list[torch.Tensor]:
        raise NotImplementedError

    def call_probs(self, q: torch.Tensor, new_valid, scale: float, start: int, end: int) -> torch.Tensor:
        """Attention probabilities of this call's queries [start, end) over every stored token.

        Call after `absorb` (the new tokens are stored). Returns [N, G, end - start, Lmax] with
        rows padded (padding columns 0); each query sees the stored tokens at or before it, inside
        the layer's window; padding queries give zero rows.
        """
        B, H, Tq, D = q.shape
        G = H // self.Hkv
        k, _, pos, valid = self.row_tensors()
        qo = q[:, :, start:end].reshape(B * self.Hkv, G * (end - start), D).float()
        scores = torch.bmm(qo, k.float().transpose(1, 2)) * scale  # [N, G*w, L]
        q_pos = torch.arange(self.seen - Tq + start, self.seen - Tq + end, device=q.device).repeat(G)
        allowed = valid[:, None, :] & (pos[:, None, :].long() <= q_pos[None, :, None])
        if self.window is not None:
            allowed &= q_pos[None, :, None] - pos[:, None, :].long() < self.window
        if new_valid is not None:
            qv = new_valid[:, None, start:end].expand(B, self.Hkv * G, end - start).reshape(B * self.Hkv, -1)
            allowed &= qv[:, :, None]
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        return probs.view(B * self.Hkv, G, end - start, -1)

    def observation_probs(self, q: torch.Tensor, new_valid, scale: float, window: int) -> torch.Tensor:
        """Attention probabilities of the last `window` queries of this call over every stored token."""
        Tq = q.shape[2]
        return self.call_probs(q, new_valid, scale, max(0, Tq - window), Tq)


_POLICIES: dict[str, type[KVPolicy]] = {}


def register_policy(name: str, *, kind: str, params: type, summary: str):
    """Class decorator: register a KV-cache policy under `name`."""

    def deco(cls):
        if name in _POLICIES:
            raise ValueError(f"KV policy {name!r} is registered twice")
        for f in params.__dataclass_fields__:
            if not f.startswith("kv_"):
                raise ValueError(f"KV policy parameters must start with 'kv_' (so they never clash), got {f!r}")
        cls.name, cls.kind, cls.Params, cls.summary = name, kind, enforce_types(params), summary
        _POLICIES[name] = cls
        return cls

    return deco


def policy_names() -> list[str]:
    return sorted(_POLICIES)


def policy_class(name: str) -> type[KVPolicy]:
    if name not in _POLICIES:
        raise ValueError(f"unknown KV-cache policy {name!r}; choose from {', '.join(policy_names())}")
    return _POLICIES[name]


def make_policy(name: str, budget: float | None = None, n_layers: int = 1, **params) -> KVPolicy:
    if not isinstance(name, str):
        raise TypeError(f"kv must be a KV-cache policy name (str), got {type(name).__name__} {name!r}")
    cls = policy_class(name)
    fields = cls.Params.__dataclass_fields__
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for KV policy {name!r}; it takes {sorted(fields)}")
    return cls(budget, cls.Params(**params), n_layers=n_layers)


def describe_policy(name: str) -> dict[str, Any]:
    cls = policy_class(name)
    fields = cls.Params.__dataclass_fields__
    defaults = cls.Params()
    return {
        "name": name,
        "kind": cls.kind,
        "summary": cls.summary,
        "params": {f: getattr(defaults, f) for f in fields},
        "help": {f: fields[f].metadata.get("help", "") for f in fields},
    }

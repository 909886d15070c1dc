"""Different methods on different query heads of one layer (a tuned plan's per-head choices).

The layer's query heads are split by the method each one runs; each group runs its method on its
own heads only (its query heads and the KV heads they read, grouped-query layout kept, keys never
repeated), and the outputs are written back in head order. Nothing is computed for a head outside
its own method's support, and measured cells are the sum over the groups. This is how DuoAttention
types heads (Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and
Streaming Heads", arXiv:2410.10819: retrieval heads dense, streaming heads a sink + local window)
and how per-head budgets run (block-topk at a different density on each head).

A layer whose heads all run one method is that method, called once on the whole layer: an
all-dense split is exactly dense attention. Not registered: it is built from a list of methods
(`attnsieve.tune.LayerChoice` with `heads`), not from hyperparameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsieve.methods.base import AttnOutput, LayerContext, Method


@dataclass(frozen=True)
class HeadSplitParams:
    heads: tuple[Method, ...]  # the method of each query head, in head order

    @property
    def causal(self) -> bool:
        """Leak-free only if every head's estimate is (read by reports as a method's `causal`)."""
        return all(bool(getattr(m.params, "causal", True)) for m in self.heads)


def head_calls(heads: list[int], group: int) -> list[tuple[list[int], list[int]]]:
    """Calls that run query heads `heads` of a layer with `group` query heads per KV head.

    Each call is (query heads, KV heads) in grouped-query layout: the query heads of KV head j come
    together, the same number per KV head. KV heads that contribute the same number of query heads
    share one call, so a whole KV group (or one head from each) is one call.
    """
    per_kv: dict[int, list[int]] = {}
    for h in sorted(heads):
        per_kv.setdefault(h // group, []).append(h)
    by_count: dict[int, list[int]] = {}
    for j, hs in per_kv.items():
        by_count.setdefault(len(hs), []).append(j)
    return [([h for j in kvs for h in per_kv[j]], kvs) for _, kvs in sorted(by_count.items())]


def _same(a: Method, b: Method) -> bool:
    return type(a) is type(b) and a.params == b.params


class HeadSplit(Method):
    """`HeadSplit([m0, m1, ...])`: query head h runs method m_h (one entry per query head)."""

    name = "per-head"
    family = "composite"
    phases = ("prefill", "decode")
    Params = HeadSplitParams
    summary = "per-head choice of methods (DuoAttention-style head typing, per-head budgets)"

    def __init__(self, heads: list[Method]):
        if not heads or not all(isinstance(m, Method) for m in heads):
            raise TypeError("HeadSplit takes a non-empty list of Method objects, one per query head")
        super().__init__(HeadSplitParams(tuple(heads)))
        # instance attributes shadow the class-level flags patch() checks
        self.supports_causal_mask = all(m.supports_causal_mask for m in heads)
        self.lookahead = any(m.lookahead for m in heads)
        groups: list[tuple[Method, list[int]]] = []
        for h, m in enumerate(heads):
            for method, hs in groups:
                if _same(method, m):
                    hs.append(h)
                    break
            else:
                groups.append((m, [h]))
        self.groups = groups

    def runs_bidirectional(self) -> bool:
        return all(m.runs_bidirectional() for m in self.params.heads)

    def prefill(self, q, k, v, ctx):
        return self._run(q, k, v, ctx, "prefill")

    def decode(self, q, k, v, ctx):
        return self._run(q, k, v, ctx, "decode")

    def _run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: LayerContext, phase: str) -> AttnOutput:
        B, H, Tq, _ = q.shape
        if H != len(self.params.heads):
            raise ValueError(f"this per-head choice names {len(self.params.heads)} heads; layer {ctx.layer_idx} "
                             f"has {H} query heads")
        if len(self.groups) == 1:  # one method for every head: the whole layer in one call
            return getattr(self.groups[0][0], phase)(q, k, v, ctx)
        group = H // k.shape[1]
        out = q.new_empty(B, H, Tq, v.shape[-1])  # [B, H, Tq, Dv]
        lse: torch.Tensor | None = q.new_empty(B, H, Tq, dtype=torch.float32)
        cells = skipped = 0
        estimate_s = 0.0
        for method, heads in self.groups:
            for qh, kvh in head_calls(heads, group):
                qi, ki = torch.tensor(qh, device=q.device), torch.tensor(kvh, device=q.device)
                res = getattr(method, phase)(q.index_select(1, qi), k.index_select(1, ki), v.index_select(1, ki), ctx)
                out[:, qh] = res.out.to(out.dtype)
                if lse is not None and res.lse is not None:
                    lse[:, qh] = res.lse.float()
                else:
                    lse = None
                cells += res.cells
                skipped += res.skipped_cells
                estimate_s += res.estimate_s
        return AttnOutput(out, cells, estimate_s, lse, skipped)

    def __repr__(self) -> str:
        return "per-head(" + ", ".join(f"{hs}: {m!r}" for m, hs in self.groups) + ")"

"""ACT: attention calibration of hidden attention sinks (exact attention, re-weighted in chosen heads).

In each calibrated head, a key is a sink when the attention it receives, averaged over the queries
that can see it, exceeds `threshold`; the first such key (usually the initial token) is left alone
and every other sink keeps only `beta` of its attention, the mass taken from it being handed to
the row's non-sink keys in proportion to their attention. The output is the re-weighted attention
times the values. Heads not calibrated run exact attention. Yu et al., "Unveiling and Harnessing
Hidden Attention Sinks: Enhancing Large Language Models without Training through Attention
Calibration", ICML 2024 (arXiv:2406.15765).

Reference followed: GATECH-EIC/ACT, `models/llama_modelling_aug.py` (`atten_process_eval`: the sink
rule, the first sink dropped from the set, the proportional redistribution) and
`scripts/calibration.sh` (beta 0.4, threshold 0.1: the defaults here). Which heads to calibrate is a
per-model search (`attnsieve.signals.calibrate_act(model, tok)`, cached; the reference's step 1):
`heads` takes its result (a model name or path whose cached search exists, its JSON file, or a
dict {layer: [query heads]}). Without `heads`, every head of the layers the method runs in is
calibrated: the sink rule on all heads, which the paper shows can hurt; run the search for the
paper's recipe (a method cannot run the model itself, so the search is not the default).

Deviations. The reference applies ACT in one forward over a classification prompt; here prefill
calls are calibrated and decoding steps run exact attention (no paper setting for them). Heads are
query heads; with grouped-query attention a calibrated head reads its KV head's keys. Sink
statistics average over the call's real queries that see the key (the reference divides by T - j
on unpadded prompts: the same). `causal=False` (paper) takes them over all the call's queries, so a
query's output depends on later queries; `causal=True` uses, for each query, the averages over the
queries up to itself only (leak-free). Cost: the layer's exact attention runs first, then the
calibrated heads' scores are computed again for the output (and once more for the statistics when
causal=False), all counted in the measured cells; no log-sum-exp is returned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnsieve.methods.base import AttnOutput, Method, exact_attention
from attnsieve.methods.registry import register

QUERY_CHUNK = 256


@dataclass
class ACTParams:
    beta: float = field(default=0.4, metadata={"help": "share of a hidden sink's attention kept, [0, 1] (1: exact)"})
    threshold: float = field(
        default=0.1, metadata={"help": "a key is a sink above this mean attention over its queries, (0, 1]"}
    )
    heads: str | dict | None = field(
        default=None, metadata={"help": "heads to calibrate: calibrate_act's result (model name, JSON path or "
                                        "{layer: [heads]}); None: every head"}
    )
    causal: bool = field(
        default=False, metadata={"help": "False (paper): sink statistics over all the call's queries; True: over "
                                         "each query's own past only (leak-free)"}
    )

    def __post_init__(self):
        if not 0 <= self.beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.heads is not None and not isinstance(self.heads, (str, dict)):
            raise ValueError(f"heads must be a model name, a JSON path or a dict, got {type(self.heads).__name__}")


def load_act_heads(spec) -> dict[int, set[int]]:
    """{layer: query heads} from a dict, a JSON file, or a model name/path whose cached search exists."""
    if isinstance(spec, dict):
        doc = spec
    else:
        path = Path(spec).expanduser()
        if path.suffix == ".json":
            if not path.is_file():
                raise ValueError(f"ACT heads file {spec!r} does not exist")
            doc = json.loads(path.read_text())
        else:
            from attnsieve.cache._heads import find_calibration, model_key

            found = find_calibration("act", model_key(spec))
            if found is None:
                raise ValueError(f"no cached ACT head search for model {spec!r}; run "
                                 "attnsieve.signals.calibrate_act(model, tok) once")
            doc = json.loads(found.read_text())
    doc = doc.get("heads", doc)
    return {int(layer): {int(h) for h in hs} for layer, hs in doc.items()}


def calibrate_rows(p: torch.Tensor, sink: torch.Tensor, beta: float) -> torch.Tensor:
    """ACT's re-weighting of attention rows p [..., Tk] given their sink keys sink [..., Tk] (bool)."""
    kept = p.masked_fill(sink, 0.0)
    rest = kept.sum(-1, keepdim=True)
    moved = (p * sink).sum(-1, keepdim=True) * (1 - beta)
    out = torch.where(sink, p * beta, p) + moved * kept / rest.clamp_min(1e-30)
    return torch.where(rest > 0, out, p)  # a row that sees only sinks stays as it is


def drop_first(sink: torch.Tensor) -> torch.Tensor:
    """The sink sets without their first (lowest-index) key along the last dim."""
    first = torch.zeros_like(sink)
    has = sink.any(-1, keepdim=True)
    first.scatter_(-1, sink.long().argmax(-1, keepdim=True), has)
    return sink & ~first


@register(
    "act",
    family="calibration",
    phases=("prefill",),
    params=ACTParams,
    summary="ACT: exact attention with hidden attention sinks scaled by beta in calibrated heads.",
)
class ACT(Method):
    exact_params = {"beta": 1.0}  # degenerate setting: equals dense attention

    def __init__(self, params=None):
        super().__init__(params)
        self._heads = None if self.params.heads is None else load_act_heads(self.params.heads)

    def heads_for(self, layer: int, H: int) -> list[int]:
        if self._heads is None:
            return list(range(H))
        return sorted(h for h in self._heads.get(layer, ()) if h < H)

    def prefill(self, q, k, v, ctx):
        p = self.params
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        sel = self.heads_for(ctx.layer_idx, H)
        if not sel or p.beta == 1.0 or Tq < 2:
            return exact_attention(q, k, v, ctx)
        base = exact_attention(q, k, v, ctx)  # every head; the calibrated ones are replaced below
        G = H // k.shape[1]
        kh = k[:, [h // G for h in sel]].float()  # [B, S, Tk, D]
        vh = v[:, [h // G for h in sel]].float()
        qh = q[:, sel].float()
        q_pos = torch.arange(Tk - Tq, Tk, device=q.device)
        keys = torch.arange(Tk, device=q.device)

        def probs(s: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
            logits = torch.einsum("bsqd,bskd->bsqk", qh[:, :, s:e], kh) * ctx.scale
            back = q_pos[s:e, None] - keys[None, :]
            allowed = (back >= 0)[None, None]
            if ctx.window is not None:
                allowed = allowed & (back < ctx.window)[None, None]
            if ctx.key_valid is not None:
                allowed = allowed & ctx.key_valid[:, None, None, :] & ctx.key_valid[:, None, Tk - Tq + s : Tk - Tq + e,
                                                                                    None]
            w = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
            return w, allowed

        S = len(sel)
        if not p.causal:  # pass 1: every key's mean attention over the call's queries that see it
            col = torch.zeros(B, S, Tk, device=q.device)
            seen = torch.zeros(B, S, Tk, device=q.device)
            for s in range(0, Tq, QUERY_CHUNK):
                w, allowed = probs(s, min(s + QUERY_CHUNK, Tq))
                col += w.sum(2)
                seen += allowed.float().sum(2).expand(B, S, Tk)
            sink_all = drop_first(col / seen.clamp_min(1) > p.threshold)  # [B, S, Tk]
        else:
            col = torch.zeros(B, S, Tk, device=q.device)
            seen = torch.zeros(B, S, Tk, device=q.device)
        out = base.out.clone()
        for s in range(0, Tq, QUERY_CHUNK):
            e = min(s + QUERY_CHUNK, Tq)
            w, allowed = probs(s, e)
            if p.causal:  # each query's own running averages (queries up to itself)
                run = col[:, :, None] + w.cumsum(2)
                cnt = seen[:, :, None] + allowed.float().expand(B, S, e - s, Tk).cumsum(2)
                col += w.sum(2)
                seen += allowed.float().sum(2).expand(B, S, Tk)
                sink = drop_first((run / cnt.clamp_min(1) > p.threshold) & (cnt > 0))
            else:
                sink = sink_all[:, :, None].expand_as(w)
            w = calibrate_rows(w, sink & allowed, p.beta)
            out[:, sel, s:e] = torch.einsum("bsqk,bskd->bsqd", w, vh).to(out.dtype)
        # the calibrated heads' scores are computed again for the output and, in the paper's form, once more
        # for the statistics (the exact pass computed them first)
        extra = base.cells * S // H * (1 if p.causal else 2)
        return AttnOutput(out, base.cells + extra)

    def decode(self, q, k, v, ctx):
        return exact_attention(q, k, v, ctx)

"""Attention re-ranking (ICR): documents ranked by how much attention a query puts on them, in one pass.

Chen et al., "Attention in Large Language Models Yields Efficient Zero-Shot Re-Rankers" (ICLR 2025,
arXiv:2410.02642), reference code OSU-NLP-Group/In-Context-Reranking (`InContextReranker`, default
scoring strategy `masked_NA_calibration`). The prompt is the reference's: an opening instruction, the
documents each marked `[i]` and separated by a blank line, a closing instruction and `Query: <query>`.
The instruction and documents are prefilled once; the query tail, then the content-free calibration
tail (`Query: N/A`), run over copies of that cache. For every read layer, the attention of each query
token (the closing instruction, `Query:` and the query: the reference's query span) is averaged over
those tokens, per head; the selected (layer, head) pairs are summed; a document's token scores are the
query's minus the calibration query's, and tokens whose calibrated score falls below mean - 2 std of
their document's are dropped before summing (the reference's masked calibration).

Attention is read through attnsieve's own attention function, for the query rows only, one layer at a
time (no T x T matrix). With a method (`method="block-topk", density=0.1`), the global layers run it
and the read probabilities are its own: softmax restricted to the support it chose for those rows.

Layers (`layers="auto"`): on a model with sliding-window layers and global ones (Gemma-3), the global
layers only: a local layer whose window ends before the documents do sees only the last of them and
pushes it first (measured: docs/results/rerank-2k.md). Elsewhere every layer. Heads: all, the retrieval
heads of `attnsieve.signals.head_profiles` (`heads="retrieval"`, top `head_fraction` of the read
layers' (layer, head) pairs, profiled once per model at 1024 tokens on 3 pass-key prompts and cached),
or an explicit set of (layer, head) pairs.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from attnsieve.kernels import BlockSupport, block_grid, support_attention
from attnsieve.methods import AttnOutput, Method, SparseMethod, exact_attention, make

OPENING = "Here are some paragraphs:"
SEPARATOR = "\n\n"
# the reference's two closing instructions (retrieval_type "IE", its default, and "QA")
CLOSINGS = {
    "ie": "Please find information that are relevant to the following query in the paragraphs above.",
    "qa": "Please answer the following question based on the information in the paragraphs above.",
}
CALIBRATION_QUERY = "N/A"
LAYER_CHOICES = ("auto", "all", "global", "sliding")
HEAD_CHOICES = ("all", "retrieval")
PROFILE_LENGTHS = (1024,)  # head profiles for heads="retrieval": short prompts, so the first call takes ~a minute
PROFILE_SAMPLES = 3


@dataclass
class IcrPrompt:
    """Token ids of an ICR prompt: a shared prefix (instruction + documents) and two tails."""

    prefix: list[int]  # BOS, opening instruction, then each document after a separator
    tail: list[int]  # separator, closing instruction, "Query:", the query
    calibration_tail: list[int]  # the same with the content-free query
    spans: list[tuple[int, int]]  # [lo, hi) of each document's tokens ("[i] text") in the prompt
    query_start: int  # offset inside a tail where the query rows start (after the separator)

    @property
    def length(self) -> int:
        return len(self.prefix) + max(len(self.tail), len(self.calibration_tail))


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def icr_prompt(tok, query: str, documents: Sequence[str], closing: str = "ie") -> IcrPrompt:
    """The reference's prompt, tokenised piece by piece so every span is exact."""
    if closing not in CLOSINGS:
        raise ValueError(f"closing must be one of {', '.join(CLOSINGS)}, got {closing!r}")
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    sep = _encode(tok, SEPARATOR)
    prefix = bos + _encode(tok, OPENING)
    spans = []
    for i, doc in enumerate(documents):
        prefix += sep
        piece = _encode(tok, f"[{i + 1}] {doc}")
        spans.append((len(prefix), len(prefix) + len(piece)))
        prefix += piece
    head = _encode(tok, CLOSINGS[closing] + SEPARATOR + "Query:")

    def tail(q: str) -> list[int]:
        return sep + head + _encode(tok, " " + q.strip())

    return IcrPrompt(prefix, tail(query), tail(CALIBRATION_QUERY), spans, len(sep))


def calibrated_scores(query_tokens: torch.Tensor, calib_tokens: torch.Tensor,
                      spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The reference's masked calibration: per document, token scores (query - calibration), tokens below
    mean - 2 std of their document's calibrated scores dropped, the rest summed. Inputs: [T] token scores."""
    out = torch.zeros(len(spans), dtype=torch.float64)
    for i, (lo, hi) in enumerate(spans):
        d = (query_tokens[lo:hi] - calib_tokens[lo:hi]).double()
        if d.numel() > 1:  # one token has no spread to judge it by: it is kept
            d = d * (d > d.mean() - 2 * d.std())
        out[i] = d.sum()
    return out


@dataclass
class RerankDetails:
    """What a rerank call read: enough to score it again under another layer or head selection."""

    ids: list  # document ids in input order
    scores: list[float]  # calibrated scores, input order
    query_mass: list[float]  # attention mass of the query on each document (selected heads), no calibration
    calibration_mass: list[float]  # the same for the content-free query
    token_scores: torch.Tensor  # [L, H, T] query rows' mean attention on each prompt position, per layer and head
    calibration_token_scores: torch.Tensor  # [L, H, T] the same for the calibration tail
    spans: list[tuple[int, int]]
    selected: list[tuple[int, int]]  # the (layer, head) pairs summed
    sliding: list[bool]  # per layer: a sliding-window layer
    method: str
    density: float | None  # measured density of the method's layers over the three forwards
    prompt_tokens: int
    params: dict = field(default_factory=dict)

    def rescore(self, pairs: Iterable[tuple[int, int]]) -> list[float]:
        """Calibrated scores (input order) had only `pairs` been summed."""
        w = torch.zeros(self.token_scores.shape[:2])
        for layer, head in pairs:
            w[layer, head] = 1.0
        q = (self.token_scores * w[..., None]).sum((0, 1))
        c = (self.calibration_token_scores * w[..., None]).sum((0, 1))
        return calibrated_scores(q, c, self.spans).tolist()


class Ranking(list):
    """[(id, score), ...] best first; `.details` is the RerankDetails of the call."""

    details: RerankDetails


class _Reader(Method):
    """Runs a layer's attention (`inner`: a SparseMethod, or None for the layer's exact attention) and, while
    `store.rows` is set, records the mean attention of those query rows on every key, per head."""

    name = "dense"
    family = "dense"
    phases = ("prefill",)
    supports_causal_mask = True
    summary = "attention read for re-ranking (never registered)"

    def __init__(self, inner: SparseMethod | None, store: _Store):
        super().__init__(params=inner.params if inner is not None else None)
        self.inner = inner
        self.store = store
        if inner is not None:
            self.name = inner.name
            self._support_takes_v = "v" in inspect.signature(inner.support).parameters

    class Params:  # no parameters of its own
        pass

    def prefill(self, q, k, v, ctx):
        if self.inner is None:
            res = exact_attention(q, k, v, ctx)
            support = None
        else:
            support = self.inner.support(q, k, ctx, v) if self._support_takes_v else self.inner.support(q, k, ctx)
            sres = support_attention(q, k, v, support, causal=True, window=ctx.window, scale=ctx.scale,
                                     key_valid=ctx.key_valid)
            res = AttnOutput(sres.out, sres.cells, 0.0, sres.lse)
        if self.store.rows is not None:
            lo = self.store.rows
            probs = row_probabilities(q, k, ctx, range(lo, q.shape[2]), support)  # [H, R, Tk]
            self.store.record(ctx.layer_idx, probs.mean(1), k.shape[2])
        return res

    def decode(self, q, k, v, ctx):
        return exact_attention(q, k, v, ctx)


@dataclass
class _Store:
    n_layers: int
    heads: int
    total: int = 0  # prompt positions of the call being read (prefix + tail)
    rows: int | None = None  # first query row of the call being read (None: not reading)
    scores: torch.Tensor | None = None  # [L, H, total]

    def arm(self, total: int, rows: int) -> None:
        self.total, self.rows = total, rows
        self.scores = torch.zeros(self.n_layers, self.heads, total)

    def record(self, layer: int, mean_probs: torch.Tensor, tk: int) -> None:
        # a sliding layer's call sees only its cached window: its keys are the last tk positions
        self.scores[layer, :, self.total - tk :] = mean_probs.float().cpu()


def support_row_mask(support: BlockSupport, rows: Sequence[int], heads: int, tq: int, tk: int) -> torch.Tensor:
    """Which keys each query head and query row may attend under `support` (batch row 0): bool [H, R, Tk].

    Rows are indices into the call's queries (query i sits at key position tk - tq + i). Blocks (with their
    per-row slot masks) and single tokens are united; causality and windows are left to the caller."""
    bs = support.block_size
    first, _, n_k = block_grid(tq, tk, bs)
    hs = support.blocks.shape[1]
    gs = heads // hs
    pos = torch.as_tensor(list(rows)) + (tk - tq)  # [R] key positions of the rows
    qb = pos // bs - first  # [R] query block of each row
    blocks = support.blocks[0][:, qb]  # [Hs, R, K]
    blocks = blocks.repeat_interleave(gs, dim=0)  # [H, R, K]
    used = blocks >= 0
    if support.row_mask is not None:
        rm = support.row_mask[0][:, qb]  # [Hs, R, Rr, K]; row r of head g inside its item: g * bs + pos % bs
        g = torch.arange(heads) % gs
        inner = g[:, None] * bs + (pos % bs)[None, :]  # [H, R]
        rm = rm.repeat_interleave(gs, dim=0)  # [H, R, Rr, K]
        used &= torch.gather(rm, 2, inner[:, :, None, None].expand(-1, -1, 1, rm.shape[-1])).squeeze(2)
    block_mask = torch.zeros(heads, len(pos), n_k + 1, dtype=torch.bool)
    block_mask.scatter_(-1, torch.where(used, blocks, n_k).cpu(), True)
    mask = block_mask[..., :n_k].repeat_interleave(bs, dim=-1)[..., :tk]  # [H, R, Tk]
    if support.tokens is not None:
        ht = support.tokens.shape[1]
        toks = support.tokens[0][:, qb].repeat_interleave(heads // ht, dim=0).cpu()  # [H, R, M]
        extra = torch.zeros(heads, len(pos), tk + 1, dtype=torch.bool)
        extra.scatter_(-1, torch.where((toks >= 0) & (toks < tk), toks, tk), True)
        mask |= extra[..., :tk]
    return mask


def row_probabilities(q: torch.Tensor, k: torch.Tensor, ctx, rows: Sequence[int],
                      support: BlockSupport | None = None) -> torch.Tensor:
    """Attention probabilities of some query rows of one call (batch row 0): [H, R, Tk], float32.

    Exact causal attention (inside the layer's window on a sliding layer), or, with a support, softmax over
    the support's keys only: the probabilities the block-sparse kernels compute for those rows."""
    _, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    rows = list(rows)
    qr = q[0, :, rows].float().reshape(Hkv, H // Hkv, len(rows), D)
    logits = torch.einsum("hgrd,htd->hgrt", qr, k[0].float()).reshape(H, len(rows), Tk) * ctx.scale
    back = (torch.as_tensor(rows) + (Tk - Tq))[:, None] - torch.arange(Tk)[None, :]  # [R, Tk]
    allowed = (back >= 0)[None].expand(H, -1, -1).clone()
    if ctx.window is not None:
        allowed &= (back < ctx.window)[None]
    if ctx.key_valid is not None:
        allowed &= ctx.key_valid[0].cpu()[None, None]
    if support is not None:
        allowed &= support_row_mask(support, rows, H, Tq, Tk)
    logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    return torch.softmax(logits, dim=-1)


def _layout(model) -> tuple[int, int, list[bool], int]:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
    return n, cfg.num_attention_heads, [t == "sliding_attention" for t in types], cfg.max_position_embeddings


def resolve_layers(layers, sliding: list[bool]) -> list[int]:
    """The layer indices `layers` names on a model with these sliding flags."""
    n = len(sliding)
    if isinstance(layers, str):
        if layers not in LAYER_CHOICES:
            raise ValueError(f"layers must be one of {', '.join(LAYER_CHOICES)} or layer indices, got {layers!r}")
        mixed = any(sliding) and not all(sliding)
        if layers == "auto":
            layers = "global" if mixed else "all"
        chosen = [i for i in range(n) if layers == "all" or (layers == "global") != sliding[i]]
        if not chosen:
            raise ValueError(f"layers={layers!r}: this model has no such layers")
        return chosen
    try:
        chosen = sorted(set(layers))
    except TypeError:
        raise ValueError(f"layers must be one of {', '.join(LAYER_CHOICES)} or layer indices, got {layers!r}") from None
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad or not chosen:
        raise ValueError(f"layer indices must be integers in [0, {n - 1}], got {layers!r}")
    return chosen


def _resolve_heads(heads, layers: list[int], n_heads: int, n_layers: int, model, tok, fraction: float,
                   profiles) -> list[tuple[int, int]]:
    if heads is None or (isinstance(heads, str) and heads == "all"):
        return [(li, h) for li in layers for h in range(n_heads)]
    if isinstance(heads, str):
        if heads != "retrieval":
            raise ValueError(f"heads must be one of {', '.join(HEAD_CHOICES)} or a set of (layer, head) pairs, "
                             f"got {heads!r}")
        from attnsieve.signals.heads import head_profiles, retrieval_query_heads

        if profiles is None:
            profiles = head_profiles(model, tok, lengths=list(PROFILE_LENGTHS), samples=PROFILE_SAMPLES,
                                     task="passkey", progress=False)
        kept = {"layers": [row for row in profiles["layers"] if row["layer"] in set(layers)]}
        if not kept["layers"]:
            raise ValueError(f"the head profiles cover none of the read layers {layers}")
        return sorted(retrieval_query_heads(kept, fraction))
    pairs = []
    for p in heads:
        if (not isinstance(p, (tuple, list)) or len(p) != 2 or any(isinstance(x, bool) or not isinstance(x, int)
                                                                    for x in p)
                or not (0 <= p[0] < n_layers and 0 <= p[1] < n_heads)):
            raise ValueError(f"heads must be (layer, head) pairs with layer in [0, {n_layers - 1}] and head in "
                             f"[0, {n_heads - 1}], got {p!r}")
        pairs.append((p[0], p[1]))
    if not pairs:
        raise ValueError("heads is an empty selection")
    return sorted(set(pairs))


def reading_method(method=None, **params) -> SparseMethod | None:
    """The method whose attention rerank reads: None for exact attention, else a SparseMethod (checked here,
    before any model work: a method without a support computes attention rerank cannot read)."""
    if method is None or (isinstance(method, str) and method == "dense"):
        if params:
            raise ValueError(f"parameters {sorted(params)} given without a method")
        return None
    m = make(method, **params) if isinstance(method, str) else method
    if params and not isinstance(method, str):
        raise ValueError("pass parameters either inside the method object or as keywords, not both")
    if not isinstance(m, Method):
        raise TypeError(f"method must be a registered name or a Method object, got {type(method).__name__}")
    if m.name == "dense":
        return None
    if not isinstance(m, SparseMethod):
        raise ValueError(f"rerank reads sparse or exact attention; {m.name!r} ({m.family}) chooses no support "
                         "whose probabilities could be read (use dense or a sparse method with a support)")
    return m


def _check_inputs(query, documents) -> tuple[list, list[str]]:
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"query must be a non-empty string, got {query!r}")
    if isinstance(documents, Mapping):
        ids, texts = list(documents.keys()), list(documents.values())
    elif isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
        raise ValueError(f"documents must be a list of strings or a mapping id -> text, got {type(documents).__name__}")
    else:
        ids, texts = list(range(len(documents))), list(documents)
    if not texts:
        raise ValueError("no documents to rerank")
    for i, t in zip(ids, texts, strict=True):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"document {i!r} must be a non-empty string, got {t!r}")
    return ids, texts


@torch.no_grad()
def rerank(model, tok, query: str, documents, *, heads=None, layers="auto", method=None, head_fraction: float = 0.1,
           profiles: dict | None = None, closing: str = "ie", backend: str | None = None, **params) -> Ranking:
    """Rank `documents` (a list of texts, or a mapping id -> text) for `query` by ICR; best first.

    Returns a `Ranking`: a list of (id, score) (ids are list indices for a list) with `.details`. `layers`:
    "auto" (global layers on models that also have sliding ones, else all), "all", "global", "sliding" or
    layer indices. `heads`: None/"all", "retrieval" (the top `head_fraction` of the read layers' heads by
    retrieval score; `profiles` may pass a `head_profiles` result) or a set of (layer, head) pairs, which
    then selects on its own (`layers` is ignored). `method` and its keyword parameters: a sparse method run
    in the global layers whose attention is read (None or "dense": exact). `closing`: "ie" or "qa", the
    reference's two closing instructions. Raises ValueError for an empty query, no documents, a prompt
    longer than the model's context, and an unknown layer or head selection.
    """
    from attnsieve.integrations.hf import _check_model, patched

    _check_model(model)
    ids, texts = _check_inputs(query, documents)
    inner = reading_method(method, **params)
    n_layers, n_heads, sliding, limit = _layout(model)
    if not (isinstance(head_fraction, (int, float)) and 0 < head_fraction <= 1):
        raise ValueError(f"head_fraction must be in (0, 1], got {head_fraction!r}")
    explicit = heads is not None and not isinstance(heads, str)
    read_layers = resolve_layers("all" if explicit else layers, sliding)
    prompt = icr_prompt(tok, query, texts, closing)
    if prompt.length > limit:
        raise ValueError(f"the query and documents take {prompt.length} tokens, beyond the model's context "
                         f"({limit} tokens)")
    pairs = _resolve_heads(heads, read_layers, n_heads, n_layers, model, tok, head_fraction, profiles)

    store = _Store(n_layers, n_heads)
    every_slides = all(sliding)
    main = _Reader(inner, store)
    overrides = {} if every_slides else {i: _Reader(None, store) for i in range(n_layers) if sliding[i]}
    device = next(model.parameters()).device
    token_scores = {}
    with patched(model, main, layers=overrides or None, backend=backend) as p:
        prefix = torch.tensor([prompt.prefix], device=device)
        cache = model(prefix, use_cache=True, logits_to_keep=1).cache
        for name, tail in (("query", prompt.tail), ("calibration", prompt.calibration_tail)):
            store.arm(len(prompt.prefix) + len(tail), prompt.query_start)
            run_cache = copy.deepcopy(cache) if name == "query" else cache
            model(torch.tensor([tail], device=device), cache=run_cache, use_cache=True, logits_to_keep=1)
            store.rows = None
            token_scores[name] = store.scores[..., : len(prompt.prefix)]  # documents lie inside the prefix
        density = p.stats.density()
    q_tok, c_tok = token_scores["query"], token_scores["calibration"]
    w = torch.zeros(n_layers, n_heads)
    for li, h in pairs:
        w[li, h] = 1.0
    q_sum = (q_tok * w[..., None]).sum((0, 1))
    c_sum = (c_tok * w[..., None]).sum((0, 1))
    scores = calibrated_scores(q_sum, c_sum, prompt.spans).tolist()
    details = RerankDetails(
        ids=ids, scores=scores,
        query_mass=[float(q_sum[lo:hi].sum()) for lo, hi in prompt.spans],
        calibration_mass=[float(c_sum[lo:hi].sum()) for lo, hi in prompt.spans],
        token_scores=q_tok, calibration_token_scores=c_tok, spans=prompt.spans, selected=pairs, sliding=sliding,
        method="dense" if inner is None else inner.name, density=density,
        prompt_tokens=len(prompt.prefix) + len(prompt.tail),
        params={} if inner is None else dataclasses.asdict(inner.params),
    )
    order = sorted(range(len(ids)), key=lambda i: (-scores[i], i))
    out = Ranking((ids[i], scores[i]) for i in order)
    out.details = details
    return out


def ndcg_at_k(ranking: Sequence, relevant: Iterable, k: int = 10) -> float:
    """Binary-relevance nDCG@k of a ranked list of ids: sum of 1 / log2(rank + 1) over the relevant ids in
    the top k, divided by the same for an ideal ranking."""
    rel = set(relevant)
    if not rel:
        raise ValueError("nDCG needs at least one relevant id")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(list(ranking)[:k]) if i in rel)
    ideal = sum(1 / math.log2(r + 2) for r in range(min(k, len(rel))))
    return dcg / ideal


__all__ = ["Ranking", "RerankDetails", "calibrated_scores", "icr_prompt", "ndcg_at_k", "reading_method", "rerank",
           "resolve_layers", "row_probabilities", "support_row_mask"]

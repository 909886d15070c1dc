"""KVzip: keep the tokens the model needs to reconstruct its own context (query-agnostic scoring).

After a prompt (a context) is prefilled, the model is run again over the cache on "Repeat the
previous context exactly." followed by the context itself, in chunks of `kv_chunk_size` tokens (a
later chunk's prompt asks to repeat "starting with" the previous chunk's last `kv_overlap` tokens).
In every global layer, a stored token's score is the largest attention any query of the replayed
chunk, in any query head of its KV group, gives it, the softmax taken over the first `kv_sink`
stored tokens, the stored chunk being repeated and the replayed tokens themselves (causally). The
replayed tokens are never stored. Then the lowest scores are evicted across all global layers and
KV heads together (one budget for the whole cache: layers and heads keep different numbers of
tokens, each row stored at its own length), or per layer with `kv_layerwise`. Kim et al., "KVzip:
Query-Agnostic KV Cache Compression with Context Reconstruction", arXiv:2505.23416 (2025).

Reference followed: NVIDIA kvpress, `kvpress/presses/kvzip_press.py`, `KVzipPress` (`prepare`
for the chunked repeat inputs and their prompts, `score_kvzip` for the scores, `compress_post` for
the global or layer-wise selection). Defaults are the reference's: `kv_chunk_size` 2048,
`kv_overlap` 8 (its `prev_postfix_size`), `kv_sink` 4 (`n_sink`), `kv_layerwise` False; the two
prompts are its texts, followed by the suffix of the tokenizer's chat template (the text between a
user turn and the model's answer; "\\n" for a tokenizer without a template), as the reference does.
`kv_budget` is the fraction of the cache kept (ceil(budget x real tokens) per row, summed over the
rows that share one selection); forced tokens (`kv_sink` first, `kv_recent` last) are always kept.

Deviations. The reference compresses by masking evicted keys; here they are removed from the
stored tensors. Its context is a chat-templated user turn whose template prefix it leaves out of
the replay; attnsieve's prompts are not templated, so the prefix left out is the prompt's leading
special tokens (BOS), which score 0 as the reference's prefix does (the forced first tokens keep
them). Sliding-window layers (Gemma-3's local layers, which the reference refuses) keep exactly
their window and take no part in the selection; the replay passes store nothing in them either.
Batches: the reference runs batch size 1; here each row replays its own real tokens (left-padded
to a common length per pass). Later multi-token calls (a second turn in query-aware mode) replay
their own tokens only: tokens kept earlier keep their scores, decoded tokens are always kept.
`kv_plus_normalization` (KVzip+) is not implemented. The replay costs about two extra prefills
(the reference warns of 2-3x the prefill cost); it runs inside the prefill forward that triggered
it, so prefill times include it. The policy needs the model's tokenizer: `patch(..., tokenizer=tok)`,
or the tokenizer saved beside the model (what `attnsieve.load` uses) is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.cache.base import EvictingKV, KVPolicy, KVPolicyParams, forced_mask, keep_count, register_policy

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


@dataclass
class KVzipParams(KVPolicyParams):
    kv_chunk_size: int = field(default=2048, metadata={"help": "context tokens replayed per pass (>= 1)"})
    kv_overlap: int = field(
        default=8, metadata={"help": "previous chunk's last tokens quoted in a later pass's prompt (>= 0)"}
    )
    kv_layerwise: bool = field(
        default=False, metadata={"help": "False (paper): one budget across all layers and heads; True: per layer"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.kv_chunk_size < 1:
            raise ValueError(f"kv_chunk_size must be >= 1, got {self.kv_chunk_size}")
        if self.kv_overlap < 0:
            raise ValueError(f"kv_overlap must be >= 0, got {self.kv_overlap}")


@dataclass
class ReplayPass:
    """One replay forward: left-padded ids and mask [B, T]; per batch row, the span (start, end) of the
    triggering call's real tokens that this pass repeats (end == start: nothing of that row)."""

    ids: torch.Tensor
    mask: torch.Tensor
    spans: list[tuple[int, int]]


@dataclass
class RepeatPrompts:
    first: list[int]
    later: list[int]
    suffix: list[int]
    special: set[int]


def repeat_prompts(tokenizer) -> RepeatPrompts:
    """The reference's repeat prompts and chat-template suffix, as token ids of `tokenizer`."""

    def enc(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    suffix = "\n"
    if getattr(tokenizer, "chat_template", None):
        dummy = "dummy context"
        sep = "\n" + "#" * len(dummy)
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": dummy + sep}], add_generation_prompt=True, tokenize=False,
            enable_thinking=False,
        )
        suffix = rendered.split(sep)[-1]
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    return RepeatPrompts(enc(FIRST_PROMPT), enc(NEXT_PROMPT), enc(suffix), special)


def chunk_scores(q: torch.Tensor, k_sink: torch.Tensor, k_chunk: torch.Tensor, k_new: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """KVzip's score of each stored chunk token [m]: the largest softmax probability any replayed query gives it.

    q [G, n, D] (the KV group's query heads, the n real replayed tokens), k_sink [s, D], k_chunk [m, D],
    k_new [n, D] (the replayed tokens' keys, seen causally). The softmax runs over sink + chunk + new."""
    n = k_new.shape[0]
    keys = torch.cat([k_sink, k_chunk, k_new]).float()
    logits = torch.matmul(q.float(), keys.T).mul_(scale)  # [G, n, s + m + n]
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
    logits[..., -n:].masked_fill_(future, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    s, m = k_sink.shape[0], k_chunk.shape[0]
    return probs[..., s : s + m].amax(dim=(0, 1))


class KVzipLayer(EvictingKV):
    """A global layer that stores everything until its policy's replay has scored it."""

    def __init__(self, layer_idx, policy, window=None):
        super().__init__(layer_idx, policy, window)
        self.zscore: list[torch.Tensor] = []  # per row, the stored tokens' scores (+inf: not scored); aligned
        # with the rows at each replay (align_scores) and after each selection (after_keep)
        self.call_offset: list[int] = []  # per row, stored index of the replayed call's first token

    def compress(self, q, k_new, new_valid, scale):
        """Nothing at the layer: the policy selects across layers once the replay has scored them."""

    def align_scores(self) -> None:
        """Extend the scores to the stored rows: tokens stored since the last replay (a new call's, decoded
        ones) score +inf until a replay scores them. Done once per replay, not per decoding step."""
        if len(self.zscore) != len(self.pos):
            self.zscore = [torch.zeros(0, device=p.device) for p in self.pos]
        for r, p in enumerate(self.pos):
            extra = p.numel() - self.zscore[r].numel()
            if extra > 0:
                self.zscore[r] = torch.cat([self.zscore[r], torch.full((extra,), torch.inf, device=p.device)])

    def probe(self, q, k_new, new_valid, scale):
        B, H, _, _ = q.shape
        G = H // self.Hkv
        for b, (s, e) in enumerate(self.probing):
            if e <= s:
                continue
            real = slice(None) if new_valid is None else new_valid[b].bool()
            for h in range(self.Hkv):
                r = b * self.Hkv + h
                a, z = self.call_offset[r] + s, self.call_offset[r] + e
                sink = min(self.p.kv_sink, a)
                k_row = self.keys[r]
                self.zscore[r][a:z] = chunk_scores(q[b, h * G : (h + 1) * G][:, real], k_row[:sink], k_row[a:z],
                                                   k_new[b, h][real], scale)

    def after_keep(self, keep):
        self.zscore = [z.index_select(0, idx.sort().values) for z, idx in zip(self.zscore, keep, strict=True)]


@register_policy(
    "kvzip",
    kind="eviction",
    params=KVzipParams,
    summary="KVzip: query-agnostic; tokens scored by the attention that replaying the context gives them.",
)
class KVzip(KVPolicy):
    replays = True

    def layer(self, layer_idx, rank=0):
        return KVzipLayer(layer_idx, self)

    def replay_passes(self, layers: list[KVzipLayer], rows: list[list[int]], tokenizer) -> list[ReplayPass]:
        """The replay forwards for a call whose real token ids per batch row are `rows` (already stored)."""
        prompts = repeat_prompts(tokenizer)
        cs, ov = self.params.kv_chunk_size, self.params.kv_overlap
        Hkv = layers[0].Hkv
        for layer in layers:
            layer.align_scores()
            layer.call_offset = [p.numel() - len(rows[r // Hkv]) for r, p in enumerate(layer.pos)]
        per_row = []  # per batch row: list of (ids, span)
        for b, toks in enumerate(rows):
            first_call = layers[0].call_offset[b * Hkv] == 0
            pre = 0
            while first_call and pre < len(toks) and toks[pre] in prompts.special:
                pre += 1  # leading special tokens (BOS) are not repeated: they score 0
            for layer in layers:
                for h in range(Hkv):
                    r = b * Hkv + h
                    layer.zscore[r][layer.call_offset[r] : layer.call_offset[r] + pre] = 0.0
            passes = []
            for i, start in enumerate(range(pre, len(toks), cs)):
                chunk = toks[start : start + cs]
                head = prompts.first if i == 0 else prompts.later + toks[max(pre, start - ov) : start]
                passes.append((head + prompts.suffix + chunk, (start, start + len(chunk))))
            per_row.append(passes)
        out = []
        for i in range(max((len(p) for p in per_row), default=0)):
            seqs, spans = [], []
            for passes in per_row:
                if i < len(passes):
                    seqs.append(passes[i][0])
                    spans.append(passes[i][1])
                else:  # this row has no chunk left: a real but unscored input keeps the batch well formed
                    seqs.append(prompts.first + prompts.suffix)
                    spans.append((0, 0))
            T = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), T, dtype=torch.long)
            mask = torch.zeros(len(seqs), T, dtype=torch.bool)
            for b, s in enumerate(seqs):
                ids[b, T - len(s) :] = torch.tensor(s, dtype=torch.long)
                mask[b, T - len(s) :] = True
            out.append(ReplayPass(ids, mask, spans))
        return out

    def finish_replay(self, layers: list[KVzipLayer]) -> None:
        """Keep the best-scoring tokens: one selection per batch row over every layer and KV head (or per
        layer with kv_layerwise), each row's share being ceil(kv_budget x its real tokens)."""
        Hkv, B = layers[0].Hkv, layers[0].B
        keep = {id(layer): [None] * len(layer.pos) for layer in layers}
        for b in range(B):
            groups = [[(layer, b * Hkv + h) for h in range(Hkv)] for layer in layers] if self.params.kv_layerwise else [
                [(layer, b * Hkv + h) for layer in layers for h in range(Hkv)]]
            for group in groups:
                scores, owners = [], []
                total = 0
                for layer, r in group:
                    p, s = layer.pos[r], layer.zscore[r].float()
                    forced = forced_mask(p, layer.seen, self.params.kv_sink, self.params.kv_recent)
                    s = torch.where(forced, torch.inf, torch.where(s == torch.inf, torch.finfo(s.dtype).max, s))
                    scores.append(s)
                    owners.append(p.numel())
                    total += keep_count(layer.valid_host[b], self.budget)
                flat = torch.cat(scores)
                chosen = torch.topk(flat, min(total, flat.numel())).indices
                start = 0
                for (layer, r), n in zip(group, owners, strict=True):
                    mine = chosen[(chosen >= start) & (chosen < start + n)] - start
                    keep[id(layer)][r] = mine
                    start += n
        for layer in layers:
            k = keep[id(layer)]
            layer.keep_rows(k)
            layer.after_keep(k)

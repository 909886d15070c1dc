"""ZipVL's dynamic ratio: each layer keeps as few tokens as carry a share `kv_tau` of its attention.

After prefill, probe queries (the last 5% of the call's queries and a random 5% of the others, as
in ZipCache, the same authors' earlier code) give every stored token its normalised attention
score (attention summed over the probes and the query heads, divided by the number of probes
that can see the token, so early tokens are not favoured for being seen more). Per layer, the
scores of all KV heads are summed, and the layer keeps the smallest set of tokens whose scores
sum to at least `kv_tau` of the total: a layer whose attention is concentrated keeps few tokens, a
diffuse one many. The kept tokens are the same for every KV head of the layer (ZipVL selects
tokens per layer so that attention over them stays one dense call). `kv_budget`, when given, caps
each layer at ceil(kv_budget x real tokens); the kept fraction is the measured one (stored bytes).
He et al., "ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification and KV
Cache Compression", arXiv:2410.08584 (2024).

A policy of its own rather than a wrapper over the other eviction policies: the rule needs
scores that are shares of attention mass (a threshold on their cumulative sum); KeyDiff's cosine,
Expected Attention's value-weighted estimate or ChunkKV's chunk sums are not, so a wrapper would
be meaningful for a few of them only and silently arbitrary for the rest.

Defaults: `kv_tau` 0.975 (the threshold of the paper's main experiments), `kv_probe_ratio` 0.1.
No reference code was released; the probe choice and the normalisation follow ZipCache's
released code (`zipcache` policy here). Deviations: ZipVL applies the same selection to the
prefill's attention (sparse prefill) and keeps unimportant tokens in its first version as
low-bit codes; here it is a decoding-cache eviction policy (the prefill runs the chosen method,
`zipcache` is the mixed-precision form). `kv_tau` 1 keeps everything. Forced tokens (`kv_sink`
first, `kv_recent` last) are kept besides the tokens the threshold chooses (their mass counts
towards it); under a `kv_budget` cap they are kept first. The prompt is compressed once
(and once per prefill chunk); decoded tokens are appended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnsieve.cache.base import EvictingKV, KVPolicy, KVPolicyParams, forced_mask, keep_count, register_policy
from attnsieve.cache.zipcache import normalised_scores, probe_queries


@dataclass
class ZipVLParams(KVPolicyParams):
    kv_tau: float = field(
        default=0.975, metadata={"help": "share of the layer's attention the kept tokens carry, (0, 1]; 1 keeps all"}
    )
    kv_probe_ratio: float = field(default=0.1, metadata={"help": "fraction of prefill queries used as probes, (0, 1]"})

    def __post_init__(self):
        super().__post_init__()
        if not (math.isfinite(self.kv_tau) and 0 < self.kv_tau <= 1):
            raise ValueError(f"kv_tau must be in (0, 1], got {self.kv_tau}")
        if not 0 < self.kv_probe_ratio <= 1:
            raise ValueError(f"kv_probe_ratio must be in (0, 1], got {self.kv_probe_ratio}")


def tokens_for_mass(scores: torch.Tensor, tau: float) -> int:
    """The fewest tokens whose scores sum to at least `tau` of all scores (all of them for tau = 1)."""
    if tau >= 1 or scores.numel() == 0:
        return scores.numel()
    s = scores.double().sort(descending=True).values
    total = s.sum()
    if total <= 0:
        return scores.numel()
    return min(scores.numel(), int(torch.searchsorted(s.cumsum(0), tau * total)) + 1)


class ZipVLLayer(EvictingKV):
    def should_compress(self, Tq):
        return Tq > 1  # the prompt once (and each prefill chunk); decoded tokens are appended

    def row_scores(self, q, r: int, probes: torch.Tensor, scale: float) -> torch.Tensor:
        """Normalised attention of the probe queries (indices into this call) on row r's stored tokens."""
        B, H, Tq, _ = q.shape
        G = H // self.Hkv
        b, h = divmod(r, self.Hkv)
        k, pos = self.keys[r], self.pos[r]
        q_pos = self.seen - Tq + probes
        s = q[b, h * G : (h + 1) * G, probes].float() @ k.float().T * scale  # [G, m, L]
        sees = pos[None, :].long() <= q_pos[:, None]  # [m, L]
        p = torch.softmax(s.masked_fill(~sees, float("-inf")), dim=-1).nan_to_num(0.0)
        return normalised_scores(p.sum(dim=(0, 1)), sees.sum(0).float() * G)

    def compress(self, q, k_new, new_valid, scale):
        Tq = k_new.shape[2]
        if not self.should_compress(Tq):
            return
        keep = [None] * len(self.pos)
        for b in range(self.B):
            rows = range(b * self.Hkv, (b + 1) * self.Hkv)
            pos = self.pos[rows[0]]
            if any(not torch.equal(self.pos[r], pos) for r in rows):
                raise RuntimeError("zipvl keeps one token set per layer; this layer's heads hold different tokens")
            real = torch.ones(Tq, dtype=torch.bool, device=q.device) if new_valid is None else new_valid[b].bool()
            probes = probe_queries(Tq, real, self.p.kv_probe_ratio, 1000003 * self.layer_idx + self.seen)
            score = sum(self.row_scores(q, r, probes, scale) for r in rows)
            forced = forced_mask(pos, self.seen, self.p.kv_sink, self.p.kv_recent)
            kept = forced.clone()
            kept[torch.topk(score, tokens_for_mass(score, self.p.kv_tau)).indices] = True
            chosen = torch.nonzero(kept).squeeze(-1)
            if self.policy.budget_given:  # the cap: forced tokens first, then the best scores
                cap = keep_count(self.valid_host[b], self.policy.budget)
                if chosen.numel() > cap:
                    chosen = torch.topk(torch.where(forced, torch.inf, score), cap).indices
            for r in rows:
                keep[r] = chosen
        self.keep_rows(keep)


@register_policy(
    "zipvl",
    kind="eviction",
    params=ZipVLParams,
    summary="ZipVL: per layer, the fewest tokens carrying kv_tau of its attention (dynamic ratio); kv_budget caps.",
)
class ZipVL(KVPolicy):
    def layer(self, layer_idx, rank=0):
        return ZipVLLayer(layer_idx, self)

"""Expected Attention: keep the prompt tokens that future queries are expected to attend most.

After prefill, the pre-RoPE queries of the prompt (its first `kv_sink` left out) are summarised per
query head by their mean mu and covariance Sigma, both moved to the future by the RoPE rotation
averaged over the next `kv_n_future_positions` positions. A Gaussian query then gives each key k the
expected attention exp(s mu.k + s^2 k^T Sigma k / 2) (s: the layer's softmax scale), normalised over
the prompt's keys, averaged over the KV group's query heads and rescaled by the value norm
(score + kv_epsilon) * ||v||; each KV head keeps its top tokens, decoded tokens are appended.
Devoto, Jeblick, Jegou, "Expected Attention: KV Cache Compression by Estimating Attention from
Future Queries Distribution", arXiv:2510.00636 (2025). Reference: NVIDIA/kvpress,
`kvpress/presses/expected_attention_press.py`, `ExpectedAttentionPress` (`score`,
`get_query_statistics`, `apply_avg_rope`).

Parameters (defaults are the reference's): `kv_n_future_positions` (512), `kv_use_covariance`
(True), `kv_use_vnorm` (True), `kv_epsilon` (0.0), and `kv_sink` (the reference's `n_sink`, 4): the
first tokens are kept, left out of the query statistics and out of the softmax, as in the reference.

Deviations. The reference recomputes pre-RoPE queries from the hidden states (q_proj, q_norm); the
layer here sees post-RoPE queries, so it un-rotates them with the layer's rotary frequencies and
the call's position ids, which the integration supplies (`LayerKV.rotary`): the same queries up to
rounding (RoPE's attention scaling factor cancels between un-rotating and rotating forward). The
future positions start at each row's next position (its last position id + 1; the reference uses
the prompt length, the same for an unpadded prompt). The scale is the layer's own (the reference's
is 1/sqrt(head_dim): the same on Llama-style models and on Gemma-3 where query_pre_attn_scalar is
the head dim). Each call with more than one
token compresses (a prefill chunk too, from that chunk's queries); kvpress compresses once per
prefill forward. Kept tokens: ceil(kv_budget * real tokens), as every attnsieve eviction policy.
Limitations: without rotary information (a model without RoPE, M-RoPE positions, or a LayerKV
driven directly) the queries are used as they arrive with no future rotation, which is exact only
for models without RoPE; interleaved-pair RoPE layouts (GPT-J style) are not handled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attnsieve.cache.base import EvictingKV, KVPolicy, KVPolicyParams, Rotary, register_policy


@dataclass
class ExpectedAttentionParams(KVPolicyParams):
    kv_sink: int = field(
        default=4, metadata={"help": "first tokens always kept, left out of the query statistics and softmax (>= 0)"}
    )
    kv_n_future_positions: int = field(
        default=512, metadata={"help": "future positions whose RoPE rotations are averaged (>= 1)"}
    )
    kv_use_covariance: bool = field(default=True, metadata={"help": "add the query covariance term k^T Sigma k"})
    kv_use_vnorm: bool = field(default=True, metadata={"help": "rescale scores as (score + kv_epsilon) * ||v||"})
    kv_epsilon: float = field(default=0.0, metadata={"help": "added to scores before the value-norm rescaling (>= 0)"})

    def __post_init__(self):
        super().__post_init__()
        if self.kv_n_future_positions < 1:
            raise ValueError(f"kv_n_future_positions must be >= 1, got {self.kv_n_future_positions}")
        if not (math.isfinite(self.kv_epsilon) and self.kv_epsilon >= 0):
            raise ValueError(f"kv_epsilon must be a finite number >= 0, got {self.kv_epsilon}")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def unrotate(x: torch.Tensor, inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [..., n, D] rotated at positions [n] -> as before RoPE (up to its attention scaling)."""
    R = 2 * inv_freq.numel()
    angles = positions.float()[:, None] * inv_freq.float()[None]  # [n, R/2], as transformers computes them
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # [n, R]
    rot = x[..., :R]
    return torch.cat([rot * cos - _rotate_half(rot) * sin, x[..., R:]], dim=-1)  # R(p)^T x


def mean_rotation(inv_freq: torch.Tensor, start: int, n: int, D: int) -> torch.Tensor:
    """[D, D]: the RoPE rotation matrix averaged over positions start .. start + n - 1."""
    half = inv_freq.numel()
    angles = torch.arange(start, start + n, device=inv_freq.device).float()[:, None] * inv_freq.float()[None]
    c, s = angles.cos().mean(0), angles.sin().mean(0)  # [R/2]
    M = torch.eye(D, device=inv_freq.device)
    i = torch.arange(half, device=inv_freq.device)
    M[i, i], M[i + half, i + half] = c, c
    M[i, i + half], M[i + half, i] = -s, s
    return M


def future_query_stats(q: torch.Tensor, rotary: Rotary | None, positions, start: int, n_future: int, covariance: bool):
    """Mean [H, D] and covariance [H, D, D] (or None) of queries q [H, n, D] moved to the future positions."""
    if rotary is not None:
        q = unrotate(q, rotary.inv_freq, positions)
    mu = q.mean(dim=1)  # [H, D]
    cov = None
    if covariance:
        c = q - mu[:, None]
        cov = c.transpose(1, 2) @ c / q.shape[1]  # biased, as the reference
    if rotary is not None:
        M = mean_rotation(rotary.inv_freq, start, n_future, q.shape[-1])
        mu = mu @ M.T
        if cov is not None:
            cov = M @ cov @ M.T
    return mu, cov


class ExpectedAttentionLayer(EvictingKV):
    def should_compress(self, Tq):
        return Tq > 1  # compress the prompt (each prefill chunk); decoded tokens are appended

    def token_scores(self, q, k_new, new_valid, scale):
        p = self.p
        B, H, Tq, D = q.shape
        G = H // self.Hkv
        rotary = self.rotary
        scores = []
        for b in range(B):
            real = torch.ones(Tq, dtype=torch.bool, device=q.device) if new_valid is None else new_valid[b].bool()
            rank = self.valid_host[b] - int(real.sum()) + torch.cumsum(real.long(), 0) - 1  # real-token rank
            used = real & (rank >= p.kv_sink)  # the reference drops the first n_sink queries
            stats = None
            if bool(used.any()):
                pos = None if rotary is None else rotary.positions[b]
                start = 0 if pos is None else int(pos[real].max()) + 1  # the row's next position
                stats = future_query_stats(
                    q[b][:, used].float(),
                    rotary,
                    None if pos is None else pos[used],
                    start,
                    p.kv_n_future_positions,
                    p.kv_use_covariance,
                )
            for h in range(self.Hkv):
                r = b * self.Hkv + h
                L = self.pos[r].numel()
                s = torch.full((L,), torch.inf, device=q.device)  # the first kv_sink tokens stay
                if stats is None:
                    scores.append(torch.where(torch.arange(L, device=q.device) < p.kv_sink, s, 0.0))
                    continue
                k = self.keys[r][p.kv_sink :].float()  # [L', D]
                if k.shape[0] == 0:
                    scores.append(s)
                    continue
                mu, cov = stats[0][h * G : (h + 1) * G], stats[1]
                z = scale * mu @ k.T  # [G, L']
                if cov is not None:
                    z = z + scale**2 / 2 * ((k[None] @ cov[h * G : (h + 1) * G]) * k[None]).sum(-1)
                a = torch.softmax(z, dim=-1).mean(0)  # normalised per query head, averaged over the group
                if p.kv_use_vnorm:
                    a = (a + p.kv_epsilon) * self.values[r][p.kv_sink :].float().norm(dim=-1)
                s[p.kv_sink :] = a
                scores.append(s)
        return scores


@register_policy(
    "expected-attention",
    kind="eviction",
    params=ExpectedAttentionParams,
    summary="Expected Attention: prompt tokens most attended by Gaussian future queries (RoPE-averaged) x value norm.",
)
class ExpectedAttention(KVPolicy):
    def layer(self, layer_idx, rank=0):
        return ExpectedAttentionLayer(layer_idx, self)

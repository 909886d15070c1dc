"""Linear attention: a fixed feature map in place of the softmax kernel, run in causal chunks.

Each query's output is sum_j phi(q) . phi(k_j) v_j / sum_j phi(q) . phi(k_j) over its causal keys
(optionally decayed by gamma^(i - j) per head), computed as in Lightning Attention: exact masked
products inside a chunk, a running state phi(k) v^T passed between chunks. Katharopoulos et al.,
"Transformers are RNNs", ICML 2020 (arXiv:2006.16236) for the map and the normalised form; Qin et
al., "Lightning Attention-2", arXiv:2401.04658 for the chunked computation and the decay.

Hyperparameters: `feature_map` ("elu1": elu(x) + 1; "relu"; "hedgehog": [softmax(x), softmax(-x)]
over the channels), `chunk` (tokens per chunk), `decay` ("none"; "retnet": per-head
gamma_h = 1 - 2^(-5 - h) as in RetNet; "constant": `gamma` for every head), `gamma`.

Deviations, and why:
- Training-free: the maps are applied to the model's own post-RoPE q and k. Hedgehog trains a
  projection before its softmax map; here it is the identity. Lightning/RetNet drop the
  denominator and rely on a trained output norm; a pretrained softmax layer expects a convex
  combination of values, so the output is normalised (Katharopoulos et al.), decay included.
- Measured density counts the products computed one by one (the own chunk's causal triangle and
  the window edge on sliding layers); earlier chunks act through the state and count nothing.
- Sliding layers (ctx.window) use a windowed state (one state per chunk, summed over the chunks
  inside the window; exact products on the chunk cut by the window edge).
No setting equals softmax attention (exact_params is None); the tests check the chunked form
against the token-by-token recurrence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from attnsieve.kernels.feature_maps import FEATURE_MAPS
from attnsieve.kernels.linear_attention import causal_feature_attention
from attnsieve.methods.base import AttnOutput, Method
from attnsieve.methods.performer import at_least_fp32
from attnsieve.methods.registry import register


@dataclass
class LinearParams:
    feature_map: Literal["elu1", "relu", "hedgehog"] = field(
        default="elu1", metadata={"help": "feature map: elu1 (elu+1), relu, hedgehog ([softmax(x), softmax(-x)])"}
    )
    chunk: int = field(
        default=64, metadata={"help": "tokens per chunk: exact products inside, state between (1..4096)"}
    )
    decay: Literal["none", "retnet", "constant"] = field(
        default="none", metadata={"help": "per-head decay gamma^(i-j): none, retnet (1 - 2^(-5-h)), constant (gamma)"}
    )
    gamma: float = field(default=0.99, metadata={"help": "decay factor for decay=constant, in (0, 1]"})

    def __post_init__(self):
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        if not 1 <= self.chunk <= 4096:
            raise ValueError(f"chunk must be in [1, 4096], got {self.chunk}")
        if self.decay not in ("none", "retnet", "constant"):
            raise ValueError(f"decay must be 'none', 'retnet' or 'constant', got {self.decay!r}")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")


def head_decays(decay: str, gamma: float, heads: int) -> torch.Tensor | None:
    """[H] per-head decay factors (None: no decay)."""
    if decay == "none":
        return None
    if decay == "retnet":
        return 1 - 2.0 ** (-5.0 - torch.arange(heads, dtype=torch.float64))
    return torch.full((heads,), gamma, dtype=torch.float64)


@register(
    "linear",
    family="lowrank",
    phases=("prefill",),
    params=LinearParams,
    summary="Linear attention (elu+1 / relu / hedgehog maps, optional decay), chunked as Lightning Attention.",
)
class Linear(Method):
    exact_params = None  # a different kernel; no setting equals softmax attention

    def prefill(self, q, k, v, ctx):
        p = self.params
        H, Tq = q.shape[1], q.shape[2]
        Tk = k.shape[2]
        fmap = FEATURE_MAPS[p.feature_map]
        fq, lq = fmap(at_least_fp32(q))
        fk, lk = fmap(at_least_fp32(k))
        gammas = head_decays(p.decay, p.gamma, H)
        if gammas is not None:
            # gamma^(i - j) = exp(i log gamma) * exp(-j log gamma), kept in the log shifts; the key
            # shift then differs per query head, so it is given per head ([B, H, Tk]).
            log_g = torch.log(gammas).to(fq.dtype).to(q.device)[None, :, None]  # [1, H, 1]
            pos = torch.arange(Tk, device=q.device, dtype=fq.dtype)
            lq = lq + log_g * pos[Tk - Tq :]
            lk = lk.repeat_interleave(H // k.shape[1], dim=1) - log_g * pos
        res = causal_feature_attention(fq, lq, fk, lk, v, window=ctx.window, key_valid=ctx.key_valid, chunk=p.chunk)
        return AttnOutput(res.out.to(q.dtype), res.cells, 0.0, res.lse)


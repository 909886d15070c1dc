"""Squeezed Attention: k-means clusters of keys, a centroid estimate of each key's attention, a threshold.

Keys are clustered with k-means; a query scores every cluster by its centroid and estimates
each key's attention probability as exp(q.c) / sum over clusters of n * exp(q.c'); the clusters
whose estimate exceeds a threshold, calibrated so that a target fraction of the keys passes,
are attended exactly, the rest are skipped. Hooper, Kim, Mohammadzadeh, Maheswaran, Zhao, Paik,
Mahoney, Keutzer, Gholami, "Squeezed Attention: Accelerating Long Context Length LLM
Inference", ACL 2025 (arXiv:2411.09688); reference SqueezeAILab/SqueezedAttention.

Hyperparameters: `cluster_frac` (clusters as a fraction of the keys, 0.05: the paper's 5%
setting), `keep_fraction` (fraction of the clustered keys the threshold keeps, 0.3: the paper's
70% sparsity setting), `observation_window` (queries on which the threshold is calibrated, 100 as
in the reference's offline calibration), `kmeans_iters` (Lloyd iterations, 20), `chunk_size`
(positions per chunk of the leak-free index, default Tk / 16), `sink` (first real tokens always
attended exactly, 4), `density` (when set, overrides keep_fraction per query chunk so that own
chunk + sinks + kept keys land near the target measured density).

Deviations, and why:
- Leak-free index (see `_clusters`): the paper clusters a fixed context offline. Here the keys
  of each chunk are clustered on their own, query chunk j uses the clusters of earlier chunks,
  and its own chunk's keys (at or before the query) run exact causal attention. The reference's
  question tokens are likewise exact over themselves.
- Calibration on the input: the paper fixes one global threshold offline (a quantile, over the
  keys, of the estimated scores averaged over 100 observation queries). Here the threshold of
  query chunk j is calibrated on the `observation_window` queries just before chunk j (earlier
  tokens, so no leak) against the same clusters, as the weighted quantile of their individual
  estimates (not of the mean, whose spread is far smaller than one query's, so that the kept
  share on those queries is the target); a threshold still keeps a varying number of keys per
  query, as the paper's does. Where no such queries exist in the call (chunked prefill), each
  query keeps its own top clusters up to the share.
- k-means: cosine k-means on normalised keys as in the reference, with the centroid used for
  scoring the mean of the raw keys (as there); seeds are evenly spaced keys of the chunk instead
  of k-means++, and iterations are capped (the reference runs up to 150 offline). The optional
  hierarchical (two-level) lookup is not implemented. Sinks are an addition (Gemma-3's first key
  carries a large norm that a centroid dilutes); set sink=0 for the paper's setting.
- Measured density counts the exact cells (own chunk, sinks, kept clusters); the centroid scores
  (one dot product per query and earlier cluster, about cluster_frac of a dense row) are not
  key cells and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.methods._clusters import ClusterMethod, chunk_length
from attnsieve.methods.registry import register


@dataclass
class SqueezedParams:
    cluster_frac: float = field(default=0.05, metadata={"help": "k-means clusters per key, in (0, 1] (paper: 5%)"})
    keep_fraction: float = field(
        default=0.3, metadata={"help": "fraction of clustered keys the calibrated threshold keeps, in [0, 1]"}
    )
    observation_window: int = field(
        default=100, metadata={"help": "queries before each chunk that calibrate its threshold (>= 0)"}
    )
    kmeans_iters: int = field(default=20, metadata={"help": "k-means (Lloyd) iterations per chunk (>= 0)"})
    chunk_size: int | None = field(
        default=None, metadata={"help": "positions per index chunk, a multiple of 16 (None: Tk / 16)"}
    )
    sink: int = field(default=4, metadata={"help": "first real tokens always attended exactly (>= 0)"})
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; overrides keep_fraction"}
    )

    def __post_init__(self):
        if not 0 < self.cluster_frac <= 1:
            raise ValueError(f"cluster_frac must be in (0, 1], got {self.cluster_frac}")
        if not 0 <= self.keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in [0, 1], got {self.keep_fraction}")
        if self.observation_window < 0:
            raise ValueError(f"observation_window must be >= 0, got {self.observation_window}")
        if self.kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {self.kmeans_iters}")
        if self.chunk_size is not None and (self.chunk_size < 16 or self.chunk_size % 16):
            raise ValueError(f"chunk_size must be a multiple of 16 and >= 16, got {self.chunk_size}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")


def keep_top_fraction(logp, count, visible, frac):
    """Per query, the highest-estimate clusters holding a `frac` share of the visible keys."""
    s = logp.masked_fill(~visible, float("-inf"))
    order = s.argsort(dim=-1, descending=True)
    n = torch.gather(count[:, None, None, :].expand_as(s), -1, order) * torch.gather(visible, -1, order)
    before = n.cumsum(-1) - n  # keys of better clusters
    need = frac * (count[:, None, None, :] * visible).sum(-1, keepdim=True)
    keep_sorted = (before < need) & torch.gather(visible, -1, order)
    return torch.zeros_like(visible).scatter_(-1, order, keep_sorted)


def calibrated_threshold(cal_scores, cal_rows, count, frac):
    """[N] threshold on per-key estimates such that, over the observation queries, the clusters
    above it hold a `frac` share of the keys (a weighted quantile, each cluster weighing its keys)."""
    N, V = count.shape
    nonempty = count > 0
    logn = torch.log(count)[:, None, None, :]
    s = cal_scores.masked_fill(~nonempty[:, None, None, :], float("-inf"))
    p = torch.exp(s - torch.logsumexp(s + logn, -1, keepdim=True))  # [N, G, nc, V]
    weight = count[:, None, None, :] * cal_rows[:, None, :, None]  # padding queries weigh nothing
    p = torch.where(weight > 0, p, -1.0).reshape(N, -1)
    vals, order = p.sort(dim=-1, descending=True)
    cum = torch.gather(weight.expand_as(cal_scores).reshape(N, -1), -1, order).cumsum(-1)
    need = frac[:, None] * cum[:, -1:]
    idx = torch.searchsorted(cum.contiguous(), need.contiguous()).clamp_max(vals.shape[-1] - 1)
    return torch.gather(vals, -1, idx).squeeze(-1)


@register(
    "squeezed",
    family="clustering",
    phases=("prefill",),
    params=SqueezedParams,
    summary="Squeezed Attention: k-means key clusters kept by a calibrated centroid threshold (chunked, leak-free).",
)
class Squeezed(ClusterMethod):
    exact_params = {"density": 1.0}  # every cluster kept: equals dense attention

    @property
    def observation_window(self):
        return self.params.observation_window

    def chunk_and_clusters(self, Tk):
        c = chunk_length(Tk, self.params.chunk_size, self.params.density)
        return c, max(1, round(self.params.cluster_frac * c))

    def select(self, scores, count, vis_ret, vis_est, frac, calib):
        N = scores.shape[0]
        if frac is None:
            frac = torch.full((N,), self.params.keep_fraction, dtype=torch.float64, device=scores.device)
        frac = frac.to(scores.dtype)
        logn = torch.log(count)[:, None, None, :]
        s = scores.masked_fill(~vis_ret, float("-inf"))
        logp = s - torch.logsumexp(s + logn, -1, keepdim=True)  # log of each key's estimated probability
        keep = keep_top_fraction(logp, count, vis_ret, frac[:, None, None, None])
        if calib is not None:
            cal_scores, cal_rows = calib
            has = cal_rows.any(-1)  # [N]
            tau = calibrated_threshold(cal_scores, cal_rows, count, frac)
            by_tau = vis_ret & (torch.exp(logp) >= tau[:, None, None, None])
            keep = torch.where(has[:, None, None, None], by_tau, keep)
        keep = torch.where((frac >= 1)[:, None, None, None], vis_ret, keep)
        keep = torch.where((frac <= 0)[:, None, None, None], torch.zeros_like(keep), keep)
        return keep, None

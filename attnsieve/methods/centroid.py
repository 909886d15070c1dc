"""RetroInfer-style tripartite attention: exact top clusters, centroid-estimated next clusters, the rest dropped.

Keys are clustered (about `cluster_size` keys per cluster); a query ranks the clusters by its
inner product with their centroids, attends the best ones exactly (retrieval zone), estimates
the next ones from their centroids (estimation zone: a cluster of n keys contributes
n * exp(q.c) to the softmax with its mean value, i.e. a partial result out = mean v,
lse = log n + q.c * scale), and drops the rest; the parts merge through their log-sum-exp. Sink
tokens and recent tokens are always exact (steady zone). Chen, Zhang, Lu, et al., "RetroInfer:
A Vector-Storage Approach for Scalable Long-Context LLM Inference", arXiv:2505.02922 (wave index).

Hyperparameters (RetroInfer's defaults): `cluster_size` (average keys per cluster, 16),
`retrieval_frac` (fraction of the visible clusters attended exactly, 0.018), `estimation_frac`
(fraction estimated from centroids, 0.232: retrieval + estimation = 25% of the clusters),
`kmeans_iters` (Lloyd iterations, 20), `chunk_size` (RetroInfer's segment of independent
clustering, 8k at 128k contexts; default Tk / 16), `sink` (first real tokens always exact, 4),
`density` (when set, drives the exact zone: each query retrieves its best clusters until they
hold the share of its visible clustered keys that makes own chunk + sinks + retrieved keys land
near the target; the estimation zone keeps its cluster count).

Deviations, and why:
- Leak-free segments (see `_clusters`): RetroInfer clusters the prompt's segments after prefill
  and uses the index for decoding. Here query chunk j of the prefill uses the clusters of the
  segments before j, and its own segment's keys (at or before the query) run exact causal
  attention: that is the steady zone's local window, sized by the chunk instead of a fixed
  window. k-means is cosine k-means on normalised keys seeded by evenly spaced keys, with the
  centroid the mean of the raw keys.
- Measured density counts the exact cells only (own chunk, sinks, retrieval zone). The
  estimation zone costs one centroid dot product per query and earlier cluster (about 1/16 of a
  dense row with 16-key clusters) and one weighted sum of mean values; those are not key cells
  and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.methods._clusters import ClusterMethod, chunk_length
from attnsieve.methods.registry import register


@dataclass
class CentroidParams:
    cluster_size: int = field(default=16, metadata={"help": "average keys per k-means cluster (>= 1)"})
    retrieval_frac: float = field(
        default=0.018, metadata={"help": "fraction of visible clusters attended exactly, in [0, 1]"}
    )
    estimation_frac: float = field(
        default=0.232, metadata={"help": "fraction of visible clusters estimated from centroids, in [0, 1]"}
    )
    kmeans_iters: int = field(default=20, metadata={"help": "k-means (Lloyd) iterations per segment (>= 0)"})
    chunk_size: int | None = field(
        default=None, metadata={"help": "positions per clustering segment, a multiple of 16 (None: Tk / 16)"}
    )
    sink: int = field(default=4, metadata={"help": "first real tokens always attended exactly (>= 0)"})
    density: float | None = field(
        default=None, metadata={"help": "target measured density in (0, 1]; drives the retrieval zone"}
    )

    def __post_init__(self):
        if self.cluster_size < 1:
            raise ValueError(f"cluster_size must be >= 1, got {self.cluster_size}")
        if not 0 <= self.retrieval_frac <= 1:
            raise ValueError(f"retrieval_frac must be in [0, 1], got {self.retrieval_frac}")
        if not 0 <= self.estimation_frac <= 1:
            raise ValueError(f"estimation_frac must be in [0, 1], got {self.estimation_frac}")
        if self.kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be >= 0, got {self.kmeans_iters}")
        if self.chunk_size is not None and (self.chunk_size < 16 or self.chunk_size % 16):
            raise ValueError(f"chunk_size must be a multiple of 16 and >= 16, got {self.chunk_size}")
        if self.sink < 0:
            raise ValueError(f"sink must be >= 0, got {self.sink}")
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")


@register(
    "centroid",
    family="clustering",
    phases=("prefill",),
    params=CentroidParams,
    summary="RetroInfer tripartite attention: exact top clusters + centroid estimate of the next (chunked, leak-free).",
)
class Centroid(ClusterMethod):
    exact_params = {"density": 1.0}  # every cluster retrieved: equals dense attention

    def chunk_and_clusters(self, Tk):
        c = chunk_length(Tk, self.params.chunk_size, self.params.density)
        return c, max(1, round(c / self.params.cluster_size))

    def select(self, scores, count, vis_ret, vis_est, frac, calib):
        p = self.params
        s = scores.masked_fill(~vis_ret, float("-inf"))
        order = s.argsort(dim=-1, descending=True)  # clusters by q . centroid
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=s.device)
                                                .expand_as(order))
        n_vis = vis_ret.sum(-1, keepdim=True)  # [N, G, cj, 1]
        if frac is None:
            n_ret = torch.where(n_vis > 0, (p.retrieval_frac * n_vis).floor().clamp_min(1), 0).long()
        else:  # best clusters until they hold `frac` of the visible clustered keys
            f = frac.to(s.dtype)[:, None, None, None]
            n = torch.gather(count[:, None, None, :].expand_as(s), -1, order) * torch.gather(vis_ret, -1, order)
            before = n.cumsum(-1) - n
            need = f * (count[:, None, None, :] * vis_ret).sum(-1, keepdim=True)
            n_ret = ((before < need) & torch.gather(vis_ret, -1, order)).sum(-1, keepdim=True)
            n_ret = torch.where(f >= 1, n_vis, n_ret)
        n_est = (p.estimation_frac * n_vis).floor().long()
        ret = (rank < n_ret) & vis_ret
        est = (rank >= n_ret) & (rank < n_ret + n_est) & vis_ret
        return ret, est

"""Feature maps phi with phi(q) . phi(k) standing in for the softmax kernel exp(q . k * scale).

Every map returns `(f, log_shift)` with phi(x) = f * exp(log_shift): `f` [..., T, M] holds bounded
non-negative features and `log_shift` [..., T] the per-row factor kept in log space, so that
exponential features neither overflow nor underflow and a shift never couples two tokens (a key's
features depend on that key alone, which keeps causal prefix sums leak-free).

- `favor_features`: FAVOR+ positive orthogonal random features (Choromanski et al., "Rethinking
  Attention with Performers", ICLR 2021, arXiv:2009.14794): phi(x) = exp(W x - |x|^2 / 2) / sqrt(M)
  with x = input * sqrt(scale), rows of W orthogonal in blocks and their norms drawn from chi(D), so
  E[phi(q) . phi(k)] = exp(q . k * scale). `hyperbolic` uses [W x, -W x] (the paper's SM_hyp+).
- `elu1_features` (Katharopoulos et al., arXiv:2006.16236), `relu_features`, and
  `hedgehog_features` ([softmax(x), softmax(-x)]; Zhang et al., arXiv:2402.04347, with the identity in
  place of Hedgehog's trained projection): deterministic maps for linear attention.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=32)
def _orthogonal_gaussian_cpu(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n_blocks = -(-rows // dim)
    q, r = torch.linalg.qr(torch.randn(n_blocks, dim, dim, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # sign fix: Q is Haar-distributed
    blocks = q.transpose(-1, -2)  # [n_blocks, dim, dim], orthonormal rows
    w = blocks.reshape(n_blocks * dim, dim)[:rows]
    norms = torch.randn(rows, dim, generator=g, dtype=torch.float64).norm(dim=-1)  # chi(dim)
    return w * norms[:, None]


def orthogonal_gaussian(rows: int, dim: int, seed: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """[rows, dim] random projection: orthogonal Gaussian blocks with chi-distributed row norms.

    Each row is marginally N(0, I) (so the FAVOR+ estimate stays unbiased) while rows of one block
    are exactly orthogonal (lower variance). Deterministic in `seed`; cached.
    """
    if rows < 1 or dim < 1:
        raise ValueError(f"projection needs rows >= 1 and dim >= 1, got rows={rows}, dim={dim}")
    return _orthogonal_gaussian_cpu(rows, dim, seed).to(device=device, dtype=dtype)


def favor_features(
    x: torch.Tensor, proj: torch.Tensor, scale: float, *, hyperbolic: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """FAVOR+ positive random features of x [..., T, D] with projection proj [m, D].

    Returns f [..., T, M] in (0, 1] (M = m, or 2m when hyperbolic) and log_shift [..., T]; the
    feature is f * exp(log_shift), i.e. exp(w . x' - |x'|^2 / 2) / sqrt(M) with x' = x sqrt(scale).
    The shift is each row's own maximum (the reference code subtracts a per-query maximum for
    queries and one global maximum for keys; a global key maximum would let a later key rescale an
    earlier one, so every key gets its own).
    """
    xs = x * math.sqrt(scale)
    proj_x = xs @ proj.to(xs.dtype).T  # [..., T, m]
    if hyperbolic:
        proj_x = torch.cat([proj_x, -proj_x], dim=-1)
    M = proj_x.shape[-1]
    a = proj_x - (xs * xs).sum(-1, keepdim=True) / 2 - 0.5 * math.log(M)
    shift = a.amax(-1, keepdim=True)
    return torch.exp(a - shift), shift.squeeze(-1)


def elu1_features(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """elu(x) + 1 (Katharopoulos et al.): positive, ~x for large x."""
    return F.elu(x) + 1, x.new_zeros(x.shape[:-1])


def relu_features(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """relu(x); a query orthogonal to every key gets a zero normaliser (its output is then 0)."""
    return torch.relu(x), x.new_zeros(x.shape[:-1])


def hedgehog_features(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[softmax(x), softmax(-x)] over the channels: Hedgehog's map with an identity projection."""
    return torch.cat([torch.softmax(x, dim=-1), torch.softmax(-x, dim=-1)], dim=-1), x.new_zeros(x.shape[:-1])


FEATURE_MAPS = {"elu1": elu1_features, "relu": relu_features, "hedgehog": hedgehog_features}

"""Shared test helpers: one tolerance table and one assert_close that reports its errors."""

from __future__ import annotations

import torch

# Per-dtype tolerances, kept in one place (STYLE.md rule 7).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol=None, rtol=None, what: str = ""):
    """torch.testing.assert_close with max-abs and relative-RMS error in the message."""
    tol = TOL.get(expected.dtype, TOL[torch.float32])
    atol = tol["atol"] if atol is None else atol
    rtol = tol["rtol"] if rtol is None else rtol
    a, e = actual.double(), expected.double()
    finite = torch.isfinite(e)
    diff = (a - e)[finite]
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rel_rms = (diff.norm() / e[finite].norm().clamp_min(1e-30)).item() if diff.numel() else 0.0
    torch.testing.assert_close(
        actual,
        expected,
        atol=atol,
        rtol=rtol,
        equal_nan=False,
        msg=lambda m: f"{what} max_abs={max_abs:.3e} rel_rms={rel_rms:.3e}\n{m}",
    )


def masked_dense_reference(q, k, v, allowed, scale=None):
    """Obviously-correct attention with an explicit boolean mask [B, H, Tq, Tk]; GQA by repetition."""
    H, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(H // Hkv, dim=1).double()
    v = v.repeat_interleave(H // Hkv, dim=1).double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(allowed, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0)[..., None]), 0)
    return (p @ v).to(q.dtype), lse.to(q.dtype)


class CharTokenizer:
    """A stand-in tokenizer for policies that replay text (KVzip) on tiny random models: one id per
    character (3 + code % 90), BOS = 1, no chat template."""

    chat_template = None
    all_special_ids = [1]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return ([1] if add_special_tokens else []) + [3 + ord(c) % 90 for c in text]

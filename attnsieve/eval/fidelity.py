"""Fidelity of a method to exact attention on the same input.

- KL(dense || method) of the next-token distributions over a teacher-forced answer span, and the
  share of span positions whose top-1 token agrees.
- Per replaced layer, on the *exact* run's own layer inputs (so errors do not compound): the
  relative Frobenius error of the attention output, and the share of each query's true attention
  mass that the method's support covered, read from log-sum-exps: exp(lse_method - lse_exact)
  is exactly the exact softmax mass on the keys the method computed.

The dense reference (span log-probabilities and captured layer inputs) is computed once per input
and reused for every method evaluated on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsieve.integrations.hf import CapturedLayer, patched
from attnsieve.kernels import dense_attention
from attnsieve.methods import Method


@dataclass
class DenseReference:
    input_ids: torch.Tensor  # [1, P + n - 1]: prompt followed by the answer without its last token
    span: int  # n: answer tokens scored
    logprobs: torch.Tensor  # [n, V] dense next-token log-probabilities over the span
    layers: dict[int, CapturedLayer]  # inputs of the global (method-replaced) layers
    exact: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (out, lse), filled once


def teacher_forced_ids(prompt_ids: torch.Tensor, answer_ids: list[int]) -> tuple[torch.Tensor, int]:
    """Prompt + answer[:-1], and the number n of positions whose next token is an answer token."""
    if not answer_ids:
        raise ValueError("the teacher-forced answer span is empty")
    tail = torch.tensor([answer_ids[:-1]], dtype=prompt_ids.dtype)
    return torch.cat([prompt_ids, tail], dim=1), len(answer_ids)


@torch.no_grad()
def span_logprobs(model, input_ids: torch.Tensor, span: int) -> torch.Tensor:
    logits = model(input_ids, logits_to_keep=span, use_cache=False).logits[0]  # [n, V]
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def dense_reference(model, prompt_ids: torch.Tensor, answer_ids: list[int]) -> DenseReference:
    """Exact-path span log-probabilities plus the captured inputs of every global layer."""
    ids, n = teacher_forced_ids(prompt_ids, answer_ids)
    with patched(model, "dense") as p, p.capturing() as captured:
        logprobs = span_logprobs(model, ids, n)
    layers = {i: c for i, c in captured.items() if c.role == "method"}
    return DenseReference(ids, n, logprobs, layers)


def kl_and_top1(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> tuple[float, float]:
    """Mean KL(dense || method) over span positions, and the top-1 agreement rate."""
    p = ref_logprobs.exp()
    kl = (p * (ref_logprobs - logprobs)).sum(-1).clamp_min(0).mean()
    top1 = (ref_logprobs.argmax(-1) == logprobs.argmax(-1)).float().mean()
    return float(kl), float(top1)


@torch.no_grad()
def layer_fidelity(
    method: Method, layers: dict[int, CapturedLayer], exact: dict[int, tuple] | None = None
) -> tuple[dict[int, float], float | None]:
    """Per layer relative Frobenius error, and the mean covered attention mass (None without lse).

    `exact` caches each layer's exact (out, lse) across the methods evaluated on one input.
    """
    errors: dict[int, float] = {}
    masses: list[torch.Tensor] = []
    for idx, c in sorted(layers.items()):
        if exact is None or idx not in exact:
            pair = dense_attention(
                c.q, c.k, c.v, causal=c.ctx.causal, window=c.ctx.window, scale=c.ctx.scale,
                key_valid=c.ctx.key_valid,
            )
            if exact is not None:
                exact[idx] = pair
        exact_out, exact_lse = exact[idx] if exact is not None else pair
        res = method.prefill(c.q, c.k, c.v, c.ctx)
        errors[idx] = float((res.out - exact_out).norm() / exact_out.norm().clamp_min(1e-30))
        if res.lse is not None:
            real = torch.isfinite(exact_lse)
            masses.append(torch.exp(res.lse - exact_lse)[real].clamp(0, 1))
        elif method.name == "dense":
            masses.append(torch.ones(1))
    mass = float(torch.cat(masses).mean()) if masses else None
    return errors, mass


@torch.no_grad()
def method_fidelity(model, method: Method, ref: DenseReference) -> dict:
    """KL, top-1 agreement, per-layer errors and covered mass of `method` against `ref`."""
    with patched(model, method):
        logprobs = span_logprobs(model, ref.input_ids, ref.span)
    kl, top1 = kl_and_top1(ref.logprobs, logprobs)
    if ref.exact is None:
        ref.exact = {}
    errors, mass = layer_fidelity(method, ref.layers, ref.exact)
    return {"kl": kl, "top1_agree": top1, "layer_rel_err": errors, "mass_covered": mass}

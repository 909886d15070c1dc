"""Fidelity of a method to exact attention on the same input.

- KL(dense || method) of the next-token distributions over an answer span, and the share of span
  positions whose top-1 token agrees, measured the way generation runs: the prompt alone is
  prefilled with the method (a look-ahead method sees the prompt's queries, never the answer's),
  then the answer tokens but the last are fed one at a time as a continuation over that cache, with
  decoding's attention (exact for prefill-only methods). Position i's distribution is the one that
  predicts answer token i. This is the definition; the answer is never teacher-forced in one
  forward pass together with the prompt, which would let a look-ahead estimate see the answer and
  would score a prefill the method never runs in generation.
- Per replaced layer, on the *exact* run's own layer inputs of the prompt prefill (so errors do not
  compound): the relative Frobenius error of the attention output, and the share of each query's
  true attention mass that the method's support covered, read from log-sum-exps:
  exp(lse_method - lse_exact) is exactly the exact softmax mass on the keys the method computed.

The dense reference (span log-probabilities and captured layer inputs) is computed once per input
and reused for every method evaluated on it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from attnsieve.integrations.hf import CapturedLayer, patched
from attnsieve.kernels import dense_attention
from attnsieve.methods import Method, make


@dataclass
class DenseReference:
    prompt_ids: torch.Tensor  # [1, P]
    answer_ids: list[int]  # the n answer tokens scored
    logprobs: torch.Tensor  # [n, V] dense next-token log-probabilities over the answer
    layers: dict[int, CapturedLayer]  # inputs of the global (method-replaced) layers in the prompt prefill
    exact: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (out, lse), filled once
    prefill_s: float | None = None  # wall-clock seconds of the exact path's prompt prefill

    @property
    def span(self) -> int:
        return len(self.answer_ids)


@torch.no_grad()
def continuation_logprobs(model, prompt_ids: torch.Tensor, answer_ids: list[int], capture=None) -> torch.Tensor:
    """[n, V] next-token log-probabilities over an answer, as generation computes them.

    The prompt is prefilled alone (by whatever attention is patched in), then answer tokens 0 .. n-2
    are fed one at a time over the cache. `capture`, a context manager, wraps the prompt prefill only.
    """
    if not answer_ids:
        raise ValueError("the answer span is empty")
    with capture if capture is not None else contextlib.nullcontext():
        out = model(prompt_ids, use_cache=True, logits_to_keep=1)
    rows = [out.logits[0, -1]]
    for t in answer_ids[:-1]:
        step = torch.tensor([[t]], dtype=prompt_ids.dtype, device=prompt_ids.device)
        out = model(step, cache=out.cache, use_cache=True, logits_to_keep=1)
        rows.append(out.logits[0, -1])
    return torch.log_softmax(torch.stack(rows).float(), dim=-1)


@torch.no_grad()
def dense_reference(model, prompt_ids: torch.Tensor, answer_ids: list[int]) -> DenseReference:
    """Exact-path answer log-probabilities plus the captured inputs of every global layer in the prompt prefill."""
    captured: dict[int, CapturedLayer] = {}
    timed = timer()
    with patched(model, "dense") as p:

        @contextlib.contextmanager
        def capture_prompt():
            with p.capturing() as store, timed:
                yield
            captured.update(store)

        logprobs = continuation_logprobs(model, prompt_ids, answer_ids, capture=capture_prompt())
    layers = {i: c for i, c in captured.items() if c.role == "method"}
    return DenseReference(prompt_ids, list(answer_ids), logprobs, layers, prefill_s=timed.seconds)


class timer(contextlib.AbstractContextManager):
    """`with t:` ... `t.seconds` (wall clock), for timing the prompt prefill inside continuation_logprobs."""

    seconds: float | None = None

    def __enter__(self):
        self._t0 = _synced_clock()
        return self

    def __exit__(self, *exc):
        self.seconds = _synced_clock() - self._t0
        return None


def _synced_clock() -> float:
    """The wall clock after queued GPU kernels finish (where torch sees a GPU; kernels are async)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def kl_and_top1(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> tuple[float, float]:
    """Mean KL(dense || method) over span positions, and the top-1 agreement rate."""
    p = ref_logprobs.exp()
    kl = (p * (ref_logprobs - logprobs)).sum(-1).clamp_min(0).mean()
    top1 = (ref_logprobs.argmax(-1) == logprobs.argmax(-1)).float().mean()
    return float(kl), float(top1)


def exact_layer(c: CapturedLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact (out, lse) of one captured layer, from the reference kernel."""
    return dense_attention(c.q, c.k, c.v, causal=c.ctx.causal, window=c.ctx.window, scale=c.ctx.scale,
                           key_valid=c.ctx.key_valid)


def error_and_mass(res, exact_out: torch.Tensor, exact_lse: torch.Tensor, dense: bool = False):
    """(relative Frobenius error, per-query covered mass [N] or None) of one method output `res`.

    exp(lse_method - lse_exact) is the exact softmax mass on the keys the method computed; a path
    without lse has no covered mass (None) unless it is dense (all of it).
    """
    err = float((res.out - exact_out).norm() / exact_out.norm().clamp_min(1e-30))
    if res.lse is not None:
        real = torch.isfinite(exact_lse)
        return err, torch.exp(res.lse - exact_lse)[real].clamp(0, 1)
    return err, (torch.ones(1) if dense else None)


@torch.no_grad()
def layer_fidelity(
    method: Method | dict[int, Method], layers: dict[int, CapturedLayer], exact: dict[int, tuple] | None = None
) -> tuple[dict[int, float], float | None]:
    """Per layer relative Frobenius error, and the mean covered attention mass (None without lse).

    `method` is one method for every layer, or {layer: method} (a plan; absent layers are dense).
    `exact` caches each layer's exact (out, lse) across the methods evaluated on one input.
    """
    errors: dict[int, float] = {}
    masses: list[torch.Tensor] = []
    dense = make("dense")
    for idx, c in sorted(layers.items()):
        if exact is None or idx not in exact:
            pair = exact_layer(c)
            if exact is not None:
                exact[idx] = pair
        exact_out, exact_lse = exact[idx] if exact is not None else pair
        m = method.get(idx, dense) if isinstance(method, dict) else method
        res = m.prefill(c.q, c.k, c.v, c.ctx)
        errors[idx], mass = error_and_mass(res, exact_out, exact_lse, dense=m.name == "dense")
        if mass is not None:
            masses.append(mass)
    mass = float(torch.cat(masses).mean()) if masses else None
    return errors, mass


@torch.no_grad()
def method_fidelity(model, method: Method | dict[int, Method], ref: DenseReference) -> dict:
    """KL, top-1 agreement, per-layer errors and covered mass of `method` against `ref` (see the module doc).

    `method` may be {layer: method} (a tuned plan's layers; other layers dense)."""
    spec = {"method": "dense", "layers": method} if isinstance(method, dict) else {"method": method}
    with patched(model, **spec):
        logprobs = continuation_logprobs(model, ref.prompt_ids, ref.answer_ids)
    kl, top1 = kl_and_top1(ref.logprobs, logprobs)
    if ref.exact is None:
        ref.exact = {}
    errors, mass = layer_fidelity(method, ref.layers, ref.exact)
    return {"kl": kl, "top1_agree": top1, "layer_rel_err": errors, "mass_covered": mass}

"""Profiles: every candidate on every replaced layer, replayed on the dense run's captured inputs.

For each calibration prompt the dense reference keeps each global layer's post-RoPE q, k, v from
the prompt prefill. Each candidate (method, parameters) runs on exactly those inputs, one layer at
a time, so no full model forward is spent per candidate and errors do not compound across layers.
Per layer and candidate, summed or averaged over the prompts:

- `rel_err`: relative Frobenius error of the output against exact attention (eval's `layer_rel_err`);
- `mass`: mean share of each query's exact softmax mass on the keys it computed (from log-sum-exps);
- `cells` / `exact_cells`: measured density as DESIGN.md defines it;
- `time_s`: measured wall-clock time of the call (support estimate + kernel; median of `reps`),
  `estimate_s` the estimate's part. The dense candidate is the exact path (fused SDPA) timed the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from attnsieve.eval.fidelity import DenseReference, error_and_mass, exact_layer
from attnsieve.kernels import exact_cells
from attnsieve.methods import Method, exact_attention, make


@dataclass(frozen=True)
class Candidate:
    label: str  # "dense" or "name[key=value,...]"
    method: str
    params: tuple[tuple[str, Any], ...] = ()

    def make(self) -> Method:
        return make(self.method, **dict(self.params))


DENSE = Candidate("dense", "dense")


@dataclass
class Measurement:
    """One candidate on one layer, over the calibration prompts (lists are per prompt)."""

    rel_err: list[float] = field(default_factory=list)
    mass: list[float | None] = field(default_factory=list)
    cells: int = 0
    exact_cells: int = 0
    time_s: float = 0.0  # summed over prompts
    estimate_s: float = 0.0

    @property
    def density(self) -> float:
        return self.cells / self.exact_cells if self.exact_cells else 1.0

    @property
    def err(self) -> float:
        """Mean relative error over the prompts (what `--target-layer-error` bounds)."""
        return sum(self.rel_err) / len(self.rel_err)

    @property
    def err2(self) -> float:
        """Mean squared relative error: the distortion the KL model adds up over layers."""
        return sum(e * e for e in self.rel_err) / len(self.rel_err)

    @property
    def mean_mass(self) -> float | None:
        known = [m for m in self.mass if m is not None]
        return sum(known) / len(known) if len(known) == len(self.mass) and known else None

    def to_json(self) -> dict:
        return {"rel_err": self.err, "mass": self.mean_mass, "density": self.density, "time_s": self.time_s,
                "estimate_s": self.estimate_s}


@dataclass
class Profile:
    layers: list[int]  # the replaced (global) layers, in order
    candidates: list[Candidate]  # DENSE first
    table: dict[int, dict[str, Measurement]]  # layer -> candidate label -> measurement

    def get(self, layer: int, label: str) -> Measurement:
        return self.table[layer][label]

    def candidate(self, label: str) -> Candidate:
        return next(c for c in self.candidates if c.label == label)

    def to_json(self) -> dict:
        return {str(layer): {lab: m.to_json() for lab, m in row.items()} for layer, row in self.table.items()}


def _timed(fn: Callable[[], Any], reps: int) -> tuple[Any, float]:
    """(result of the first call, median seconds over `reps` calls)."""
    times, result = [], None
    for r in range(reps):
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
        if r == 0:
            result = res
    return result, statistics.median(times)


@torch.no_grad()
def profile(refs: list[DenseReference], candidates: list[Candidate], *, reps: int = 1,
            progress: Callable[[str], None] | None = None) -> Profile:
    """Measure every candidate on every captured global layer of every reference (see the module doc).

    Before timing, each method runs once untimed on the first layer (one-time costs: allocation,
    compiled-kernel loading), so the first candidate is not charged for them.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    if not refs:
        raise ValueError("profiling needs at least one calibration prompt")
    cands = [DENSE, *[c for c in candidates if c != DENSE]]
    layers = sorted(refs[0].layers)
    if not layers:
        raise ValueError("the model has no global attention layer for a method to replace")
    table = {layer: {c.label: Measurement() for c in cands} for layer in layers}
    methods = {c.label: c.make() for c in cands}
    warm = refs[0].layers[layers[0]]
    for name in dict.fromkeys(c.method for c in cands):
        m = next(methods[c.label] for c in cands if c.method == name)
        if name == "dense":
            exact_attention(warm.q, warm.k, warm.v, warm.ctx)
        else:
            m.prefill(warm.q, warm.k, warm.v, warm.ctx)
    for p, ref in enumerate(refs):
        for layer in layers:
            c = ref.layers[layer]
            exact_out, exact_lse = exact_layer(c)
            for cand in cands:
                if progress:
                    progress(f"profile prompt {p + 1}/{len(refs)} layer {layer}: {cand.label}")
                m = methods[cand.label]
                if cand.method == "dense":  # the exact path a plan's dense layer runs: fused SDPA
                    res, seconds = _timed(lambda c=c: exact_attention(c.q, c.k, c.v, c.ctx), reps)
                else:
                    res, seconds = _timed(lambda m=m, c=c: m.prefill(c.q, c.k, c.v, c.ctx), reps)
                err, mass = error_and_mass(res, exact_out, exact_lse, dense=cand.method == "dense")
                if cand.method == "dense":  # the exact path; its difference from the reference kernel is rounding
                    err = 0.0
                meas = table[layer][cand.label]
                meas.rel_err.append(err)
                meas.mass.append(None if mass is None else float(mass.mean()))
                meas.cells += res.cells
                meas.exact_cells += exact_cells_of(c)
                meas.time_s += seconds
                meas.estimate_s += res.estimate_s
                del res
    return Profile(layers, cands, table)


def exact_cells_of(c) -> int:
    """Cells the exact layer computes on a captured input (all heads and batch rows)."""
    q, k = c.q, c.k
    return q.shape[1] * exact_cells(q.shape[2], k.shape[2], causal=c.ctx.causal, window=c.ctx.window,
                                    key_valid=c.ctx.key_valid, batch=q.shape[0])


def candidates_for(methods: list[str], densities: list[float] | None,
                   sets: dict[str, dict[str, Any]] | None = None) -> list[Candidate]:
    """One candidate per method, or per density for methods with a density knob (eval's expansion)."""
    from attnsieve.eval.runner import expand_configs

    configs = expand_configs(methods, densities, sets or {})
    return [Candidate(c.label, c.method, c.params) for c in configs]

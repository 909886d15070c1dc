"""Profiles: every candidate on every replaced layer (or head), replayed on the dense run's captured inputs.

For each calibration prompt the dense reference keeps each global layer's post-RoPE q, k, v from
the prompt prefill. Each candidate (method, parameters) runs on exactly those inputs, one layer at
a time, so no full model forward is spent per candidate and errors do not compound across layers.
With `per_head`, the unit is one query head of one layer: the candidate runs on that head's
queries alone and the KV head it reads (grouped-query attention sliced, never repeated).
Per unit and candidate, summed or averaged over the prompts:

- `rel_err`: relative Frobenius error of the output against exact attention, with the prompt's last
  `TAIL_ROWS` query rows weighted as much as all rows together: err^2 = (e_all^2 + e_tail^2) / 2,
  each term relative to the whole layer's exact output over those rows. The answer is read from the
  end of the prompt, where a needle is retrieved; over all rows a local window looks accurate (most
  rows attend nearby) even in a head that retrieves, so the plain error ranked window heads as safe
  and their plans failed on held-out needles (docs/results/tune-4k). For a head, both terms are
  relative to the whole layer's rows, so a layer's squared error is the sum of its heads' (and a
  head that carries little of the layer's output weighs little);
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
from attnsieve.tune.plan import LayerChoice

# Query rows at the end of each calibration prompt whose error counts as much as all rows' (the
# question's block and the positions the answer is decoded from)
TAIL_ROWS = 64


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


Unit = int | tuple[int, int]  # a layer index, or (layer index, query head)


def unit_key(unit: Unit) -> str:
    """"3" for layer 3, "3.1" for its query head 1 (report and JSON keys)."""
    return str(unit) if isinstance(unit, int) else f"{unit[0]}.{unit[1]}"


def layer_of(unit: Unit) -> int:
    return unit if isinstance(unit, int) else unit[0]


@dataclass
class Profile:
    layers: list[int]  # the replaced (global) layers, in order
    candidates: list[Candidate]  # DENSE first
    table: dict[Unit, dict[str, Measurement]]  # unit -> candidate label -> measurement
    heads: int | None = None  # query heads per layer when the units are (layer, head); None: units are layers

    @property
    def units(self) -> list[Unit]:
        return list(self.table)

    def get(self, unit: Unit, label: str) -> Measurement:
        return self.table[unit][label]

    def candidate(self, label: str) -> Candidate:
        return next(c for c in self.candidates if c.label == label)

    def units_of(self, layer: int) -> list[Unit]:
        return [u for u in self.table if layer_of(u) == layer]

    def layer_row(self, layer: int) -> dict[str, Measurement]:
        """Every candidate on the whole layer (its heads' measurements combined when units are heads)."""
        if self.heads is None:
            return self.table[layer]
        return {lab: self.combined({u: lab for u in self.units_of(layer)}) for lab in self.table[(layer, 0)]}

    def combined(self, choice: dict[Unit, str]) -> Measurement:
        """One layer's measurement when its units run `choice`: errors add in squares per prompt
        (head errors are relative to the whole layer), cells and seconds add, masses average."""
        ms = [self.get(u, lab) for u, lab in choice.items()]
        if len(ms) == 1:
            return ms[0]
        n = len(ms[0].rel_err)
        err = [sum(m.rel_err[p] ** 2 for m in ms) ** 0.5 for p in range(n)]
        mass = [None if any(m.mass[p] is None for m in ms) else sum(m.mass[p] for m in ms) / len(ms)
                for p in range(n)]
        return Measurement(err, mass, sum(m.cells for m in ms), sum(m.exact_cells for m in ms),
                           sum(m.time_s for m in ms), sum(m.estimate_s for m in ms))

    def layer_err(self, layer: int, choice: dict[Unit, str]) -> float:
        """Mean relative output error of `layer` under a choice for its units (the layer-error target's measure)."""
        return self.combined({u: choice[u] for u in self.units_of(layer)}).err

    def layer_choices(self, choice: dict[Unit, str]) -> dict[int, LayerChoice]:
        """A plan's layer entries for a choice over units: per layer, one choice, or one per head
        (collapsed to one when every head of the layer has the same)."""
        def leaf(lab: str) -> LayerChoice:
            c = self.candidate(lab)
            return LayerChoice(c.method, dict(c.params))

        out: dict[int, LayerChoice] = {}
        for layer in self.layers:
            units = [u for u in self.units_of(layer) if u in choice]
            if not units:
                continue
            if self.heads is None:
                out[layer] = leaf(choice[layer])
            else:
                if len(units) != self.heads:
                    raise ValueError(f"layer {layer}: a per-head choice must cover all {self.heads} heads")
                out[layer] = LayerChoice.per_head([leaf(choice[u]) for u in sorted(units)])
        return out

    def time_ratio(self, choice: dict[Unit, str]) -> float:
        """Measured attention time of a choice's units over the exact path's on the same units and prompts."""
        dense = sum(self.get(u, "dense").time_s for u in choice)
        return sum(self.get(u, lab).time_s for u, lab in choice.items()) / dense if dense else 1.0

    def to_json(self) -> dict:
        return {unit_key(u): {lab: m.to_json() for lab, m in row.items()} for u, row in self.table.items()}


def _timed(fn: Callable[[], Any], reps: int, device: torch.device | None = None) -> tuple[Any, float]:
    """(result of the first call, median seconds over `reps` calls); on CUDA each call synchronised."""
    cuda = device is not None and device.type == "cuda"
    times, result = [], None
    for r in range(reps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        res = fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if r == 0:
            result = res
    return result, statistics.median(times)


@torch.no_grad()
def profile(refs: list[DenseReference], candidates: list[Candidate], *, reps: int = 1, per_head: bool = False,
            progress: Callable[[str], None] | None = None) -> Profile:
    """Measure every candidate on every captured global layer (or query head, with `per_head`) of every
    reference (see the module doc).

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
    n_heads = refs[0].layers[layers[0]].q.shape[1]
    units: list[Unit] = [(layer, h) for layer in layers for h in range(n_heads)] if per_head else list(layers)
    table = {u: {c.label: Measurement() for c in cands} for u in units}
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
            norm = exact_out.norm().clamp_min(1e-30)
            tail = min(TAIL_ROWS, exact_out.shape[2])
            tail_norm = exact_out[:, :, -tail:].norm().clamp_min(1e-30)
            exact_all = exact_cells_of(c)
            H, Hkv = c.q.shape[1], c.k.shape[1]
            for unit in (u for u in units if layer_of(u) == layer):
                if isinstance(unit, int):
                    q, k, v, ex_out, ex_lse, exact = c.q, c.k, c.v, exact_out, exact_lse, exact_all
                else:  # one query head and the KV head it reads
                    h, j = unit[1], unit[1] // (H // Hkv)
                    q, k, v = c.q[:, h : h + 1], c.k[:, j : j + 1], c.v[:, j : j + 1]
                    ex_out, ex_lse, exact = exact_out[:, h : h + 1], exact_lse[:, h : h + 1], exact_all // H
                for cand in cands:
                    if progress:
                        progress(f"profile prompt {p + 1}/{len(refs)} {'layer' if isinstance(unit, int) else 'head'} "
                                 f"{unit_key(unit)}: {cand.label}")
                    m = methods[cand.label]
                    dev = q.device
                    if cand.method == "dense":  # the exact path a plan's dense layer runs: fused SDPA
                        res, seconds = _timed(lambda q=q, k=k, v=v, ctx=c.ctx: exact_attention(q, k, v, ctx), reps, dev)
                    else:
                        res, seconds = _timed(lambda m=m, q=q, k=k, v=v, ctx=c.ctx: m.prefill(q, k, v, ctx), reps, dev)
                    _, mass = error_and_mass(res, ex_out, ex_lse, dense=cand.method == "dense")
                    # relative to the whole layer's exact output (see the module doc); the exact path's
                    # difference from the reference kernel is rounding
                    if cand.method == "dense":
                        err = 0.0
                    else:
                        diff = res.out - ex_out
                        e_all = float(diff.norm() / norm)
                        e_tail = float(diff[:, :, -tail:].norm() / tail_norm)
                        err = ((e_all**2 + e_tail**2) / 2) ** 0.5
                    meas = table[unit][cand.label]
                    meas.rel_err.append(err)
                    meas.mass.append(None if mass is None else float(mass.mean()))
                    meas.cells += res.cells
                    meas.exact_cells += exact
                    meas.time_s += seconds
                    meas.estimate_s += res.estimate_s
                    del res
    return Profile(layers, cands, table, n_heads if per_head else None)


def merge(parts: list[Profile]) -> Profile:
    """One profile from profiles of consecutive prompt ranges (in prompt order), as if profiled at once:
    per-prompt lists concatenate, counts and seconds add."""
    first = parts[0]
    table = {}
    for u, row in first.table.items():
        table[u] = {}
        for lab in row:
            ms = [p.table[u][lab] for p in parts]
            table[u][lab] = Measurement([e for m in ms for e in m.rel_err], [x for m in ms for x in m.mass],
                                        sum(m.cells for m in ms), sum(m.exact_cells for m in ms),
                                        sum(m.time_s for m in ms), sum(m.estimate_s for m in ms))
    return Profile(first.layers, first.candidates, table, first.heads)


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

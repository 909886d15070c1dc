"""The tuning run: dense references, profiles, sensitivity probes, the verified search, the plan.

1. One dense reference per calibration prompt (a full forward: answer log-probabilities and the
   global layers' captured q/k/v).
2. Profiles of every candidate on every global layer, or every query head of one (`granularity`
   "head", the default), from those captures (no full forward).
3. For a KL or top-1 target: one probe per layer and prompt (full forwards with that layer alone
   replaced by its middle hull candidate) gives the layer's sensitivity; the greedy / Lagrangian
   path from the cheapest plan to the exact one; the verified search along it (`search.py`).
   For a layer-error target: each layer's cheapest candidate within the bound, verified once.
   Then the uniform check (`uniform_check`, on by default): per candidate method, the cheapest of its
   uniform configurations (that candidate on every unit) cheaper than the path's plan that meets the
   target, by bisection over its configurations in cost order (at most `max_uniform_verify` per
   method); a uniform configuration that passes and costs less replaces the path's plan. The error
   model behind the path ranks units by their output error, which can favour plans that a uniform
   configuration beats at the target; with the check, the plan never costs more on the calibration
   prompts than a verified uniform configuration the search could name.
4. The plan, with the verified numbers and a report of how many full forwards it took.
5. With a validation spec (`--validate`): the plan, dense, every candidate applied uniformly and
   the plans for several targets around the plan's, measured on held-out prompts (`validate.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from attnsieve.runinfo import run_info
from attnsieve.tune import calibration
from attnsieve.tune.calibration import CalibPrompt
from attnsieve.tune.plan import Plan, Target, fingerprint
from attnsieve.tune.pool import LocalPool
from attnsieve.tune.profile import Candidate, Profile, Unit, unit_key
from attnsieve.tune.search import (
    OBJECTIVES,
    PathPoint,
    cost,
    floor_weights,
    lagrangian_path,
    layer_error_choice,
    probe_candidate,
    search,
    sensitivity,
)
from attnsieve.tune.validate import Frontier, ValidationSpec, steps_needed, validate
from attnsieve.tune.verify import Verification

# progress(description, steps done, steps expected): the total grows when the search needs more
Progress = Callable[[str, int, int], None]

GRANULARITIES = ("head", "layer")  # what one choice covers: a query head of a layer, or a whole layer


@dataclass
class TuneSpec:
    target: Target
    candidates: list[Candidate]
    objective: str = "time"  # what is minimised: measured attention time, or measured density
    max_verify: int = 6  # verifications (each a full forward per prompt) the search may spend
    uniform_check: bool = True  # also verify uniform configurations cheaper than the path's plan
    max_uniform_verify: int = 3  # verifications the uniform check may spend per candidate method
    # timed repetitions per profiled call (median; the first also gives the outputs). None: 3 when the
    # objective is time (single timings of short calls on a busy machine rank candidates by noise), else 1
    reps: int | None = None
    granularity: str = "head"  # one of GRANULARITIES
    model: str = ""  # the name the plan records
    seed: int = 0
    extra: dict = field(default_factory=dict)  # recorded in the plan's `tuning` report (the command line)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.max_verify < 1:
            raise ValueError(f"--max-verify must be >= 1, got {self.max_verify}")
        if self.max_uniform_verify < 1:
            raise ValueError(f"--max-uniform-verify must be >= 1, got {self.max_uniform_verify}")
        if not self.candidates:
            raise ValueError("tuning needs at least one candidate method")
        if self.reps is None:
            self.reps = 3 if self.objective == "time" else 1
        if self.reps < 1:
            raise ValueError(f"--reps must be >= 1, got {self.reps}")


class _Steps:
    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.done, self.total = progress, 0, total

    def __call__(self, desc: str) -> None:
        if self.progress:
            self.progress(desc, self.done, self.total)
        self.done += 1


def tune(model, prompts: list[CalibPrompt], spec: TuneSpec, progress: Progress | None = None,
         validation: ValidationSpec | None = None, pool=None) -> tuple[Plan, dict]:
    """Tune a plan for `model` on the calibration `prompts`; returns (plan, report). With `validation`,
    the report's `validation` holds the held-out comparison (validate.py). `pool` runs the model work
    elsewhere (distributed.RayPool; `model` may then be None); by default it runs in this process."""
    if not prompts:
        raise ValueError("tuning needs at least one calibration prompt")
    if pool is None:
        pool = LocalPool(model, None if validation is None else validation.tok)
    t0 = time.perf_counter()
    n = len(prompts)
    n_cand = len({c.label for c in spec.candidates} | {"dense"})
    steps = _Steps(progress, n)  # grows once the number of global layers is known
    phase = {"dense_reference": 0.0, "profile": 0.0, "probe": 0.0, "verify": 0.0}  # wall-clock seconds
    infos = pool.references("calib", prompts, steps)
    dense_s = sum(i.prefill_s for i in infos)
    phase["dense_reference"] = time.perf_counter() - t0
    n_layers = len(infos[0].layers)
    per_head = spec.granularity == "head"
    n_units = n_layers * (infos[0].heads if per_head else 1)
    probes = 0 if spec.target.kind == "layer_error" else n_layers
    steps.total = n + n * n_units * n_cand + (probes + spec.max_verify) * n
    t1 = time.perf_counter()
    prof = pool.profile("calib", spec.candidates, spec.reps, per_head, steps)
    phase["profile"] = time.perf_counter() - t1
    forwards = {"dense_reference": n, "probe": 0, "verify": 0}

    def run(choice: dict[Unit, str], what: str) -> Verification:
        for _ in range(n):
            steps(what)
        kind = "probe" if what.startswith("probe") else "verify"
        forwards[kind] += n
        t = time.perf_counter()
        result = Verification.from_rows(pool.verify("calib", prof.layer_choices(choice)), dense_s)
        phase[kind] += time.perf_counter() - t
        return result

    report: dict = {"objective": spec.objective, "granularity": spec.granularity,
                    "candidates": [c.label for c in prof.candidates]}
    path: list[PathPoint] = []
    tried: dict[int, Verification] = {}
    index = 0
    if spec.target.kind == "layer_error":
        choice = layer_error_choice(prof, spec.objective, spec.target.value)
        result = None if _exact(choice) else run(choice, "verify the plan")
        report["search"] = {"method": "per-layer cheapest within the error bound"}
    else:
        weights, report["probes"] = _sensitivities(prof, spec.objective, run)
        path = lagrangian_path(prof, spec.objective, weights)
        steps.total = steps.done + spec.max_verify * n

        def met(v: Verification) -> bool:
            return spec.target.met(kl=v.kl, top1=v.top1)

        def check(i: int) -> Verification:
            return run(path[i].choice, f"verify plan {i + 1}/{len(path)} (predicted KL {path[i].predicted:.3g})")

        index, tried = search(path, spec.target, check, met, lambda v: v.kl, spec.max_verify)
        choice = path[index].choice
        result = tried.get(index)
        report["search"] = {
            "method": "greedy/Lagrangian path over per-layer convex hulls, verified search along it",
            "path": [{"choice": {unit_key(u): lab for u, lab in pt.choice.items()}, "cost": pt.cost,
                      "predicted_kl": pt.predicted, "moved": None if pt.moved is None else unit_key(pt.moved)}
                     for pt in path],
            "verified": [{"index": i, **v.to_json(), "met": met(v)} for i, v in sorted(tried.items())],
            "chosen": index,
        }
        if result is None and not _exact(choice):  # the search ran out of verifications above a plan it never ran
            result = run(choice, "verify the plan")
    if spec.target.kind != "layer_error" and spec.uniform_check:
        plan_cost = sum(cost(prof.get(u, lab), spec.objective) for u, lab in choice.items())
        steps.total = steps.done + spec.max_uniform_verify * n * len({c.method for c in prof.candidates})
        best, log = _uniform_check(prof, spec, run, lambda v: spec.target.met(kl=v.kl, top1=v.top1), plan_cost)
        report["uniform_check"] = log
        if best is not None:
            choice, result = best
            report["search"]["chosen_from"] = "uniform"
        else:
            report["search"]["chosen_from"] = "path"
        steps.total = steps.done
    if result is None:  # every layer exact: nothing to measure
        result = Verification(0.0, 1.0, 1.0, dense_s, dense_s)
    layer_err = {layer: prof.layer_err(layer, choice) for layer in prof.layers}
    if not spec.target.met(kl=result.kl, top1=result.top1, layer_error=max(layer_err.values())):
        raise RuntimeError("internal error: the tuner chose a plan that does not meet its target")
    report["full_forwards"] = {**forwards, "total": sum(forwards.values())}
    report["choice"] = {unit_key(u): lab for u, lab in choice.items()}
    report["profile"] = prof.to_json()
    report["layer_rel_err"] = {str(layer): e for layer, e in layer_err.items()}
    report["layer_density"] = {str(layer): prof.combined({u: choice[u] for u in prof.units_of(layer)}).density
                               for layer in prof.layers}
    report["prefill_ratio"] = result.prefill_ratio
    if validation is not None:
        frontier = _frontier(prof, spec, choice, path, tried, index, validation.fractions)
        steps.total = steps.done + steps_needed(validation, prof, frontier)
        t = time.perf_counter()
        report["validation"] = validate(pool, validation, prof, choice, frontier, spec.objective, steps)
        phase["validate"] = time.perf_counter() - t
    report["seconds"] = time.perf_counter() - t0
    report["phase_seconds"] = phase
    report.update(spec.extra)
    info = run_info(spec.seed, pool.dtype)
    plan = Plan(
        model=spec.model or str(getattr(pool.config, "_name_or_path", "") or "model"),
        fingerprint=fingerprint(pool.config), target=spec.target,
        layers=prof.layer_choices(choice),
        calibration=calibration.describe(prompts), kl=result.kl, top1=result.top1,
        measured_density=result.density, time_ratio=prof.time_ratio(choice), seed=spec.seed,
        versions=info["versions"], threads=info["threads"],
        extra={"objective": spec.objective, "granularity": spec.granularity, "dtype": info["dtype"],
               "device": info["device"], "tuning": report},
    )
    return plan, report


def _frontier(prof: Profile, spec: TuneSpec, choice: dict[Unit, str], path: list[PathPoint],
              tried: dict[int, Verification], index: int, fractions: tuple[float, ...]) -> list[Frontier]:
    """The plan, and the plans the same run gives for other targets: the path points at `fractions` of
    the way from the cheapest plan's cost to exact attention's (each is the plan for the targets
    between its KL and the next point's), labelled by their predicted KL rescaled by the verifications
    (measured / predicted at the verified point nearest the plan). A layer-error target has no path:
    its bound times 1/4, 1/2, 2 and 4 instead."""
    t = spec.target
    out = [Frontier(f"{t.kind}{'>=' if t.kind == 'top1' else '<='}{t.value:g}", t.value, choice, chosen=True)]
    seen = [choice]

    def add(label: str, value: float | None, ch: dict[Unit, str]) -> None:
        if ch not in seen and not _exact(ch):  # exact attention is the dense row already
            seen.append(ch)
            out.append(Frontier(label, value, ch))

    if t.kind == "layer_error":
        for f in (0.25, 0.5, 2.0, 4.0):
            add(f"layer_error<={t.value * f:.3g}", t.value * f, layer_error_choice(prof, spec.objective, t.value * f))
        return out
    if not path:
        return out
    scale = 1.0
    near = [i for i in tried if path[i].predicted > 0 and tried[i].kl > 0]
    if near:
        i = min(near, key=lambda j: abs(j - index))
        scale = tried[i].kl / path[i].predicted
    lo, hi = path[0].cost, path[-1].cost
    for q in fractions:
        j = min(range(len(path)), key=lambda j: abs(path[j].cost - (lo + q * (hi - lo))))
        kl = path[j].predicted * scale
        add(f"kl<={kl:.3g} (predicted)", kl, path[j].choice)
    return out


def _uniform_check(prof: Profile, spec: TuneSpec, run, met, plan_cost: float):
    """The cheapest verified uniform configuration cheaper than `plan_cost` that meets the target, or None.

    Per candidate method, its uniform configurations cheaper than the plan, in cost order, bisected for
    the cheapest that passes (assumes accuracy grows with cost along one method's configurations; at
    most `spec.max_uniform_verify` verifications each). Returns ((choice, verification) or None, log)."""
    units = prof.units
    by_method: dict[str, list[tuple[float, str]]] = {}
    for c in prof.candidates:
        if c.label == "dense":
            continue
        total = sum(cost(prof.get(u, c.label), spec.objective) for u in units)
        if total < plan_cost:
            by_method.setdefault(c.method, []).append((total, c.label))
    best, log = None, []
    for method in sorted(by_method):
        configs = sorted(by_method[method])
        lo, hi, spent = -1, len(configs), 0  # configs[hi:] pass or are untried above the last pass
        passing = None
        while hi - lo > 1 and spent < spec.max_uniform_verify:
            mid = (lo + hi) // 2
            total, lab = configs[mid]
            v = run(dict.fromkeys(units, lab), f"uniform check: {lab}")
            spent += 1
            ok = met(v)
            log.append({"label": lab, "cost": total, **v.to_json(), "met": ok})
            if ok:
                hi, passing = mid, (total, lab, v)
            else:
                lo = mid
        if passing is not None and (best is None or passing[0] < best[0]):
            best = passing
    if best is None:
        return None, log
    return (dict.fromkeys(units, best[1]), best[2]), log


def _exact(choice: dict[Unit, str]) -> bool:
    return all(lab == "dense" for lab in choice.values())


def _sensitivities(prof: Profile, objective: str, run) -> tuple[dict[Unit, float], dict]:
    """w per unit from one probe per layer (full forwards with that layer alone replaced, all its heads
    by one candidate); a layer's heads share its weight."""
    weights, log = {}, {}
    for layer in prof.layers:
        units = prof.units_of(layer)
        lab = probe_candidate(prof, layer, objective)
        if lab is None:  # nothing cheaper than exact on this layer: no choice to weigh
            weights.update(dict.fromkeys(units, 0.0))
            continue
        v = run(dict.fromkeys(units, lab), f"probe layer {layer}: {lab}")
        err2 = prof.layer_row(layer)[lab].err2
        w = sensitivity(v.kl, err2)
        weights.update(dict.fromkeys(units, w))
        log[str(layer)] = {"candidate": lab, "kl": v.kl, "top1": v.top1, "err2": err2, "weight": w}
    return floor_weights(weights), log


__all__ = ["GRANULARITIES", "Candidate", "TuneSpec", "cost", "tune"]

"""The tuning run: dense references, profiles, sensitivity probes, the verified search, the plan.

1. One dense reference per calibration prompt (a full forward: answer log-probabilities and the
   global layers' captured q/k/v).
2. Profiles of every candidate on every global layer from those captures (no full forward).
3. For a KL or top-1 target: one probe per layer and prompt (full forwards with that layer alone
   replaced by its middle hull candidate) gives the layer's sensitivity; the greedy / Lagrangian
   path from the cheapest plan to the exact one; the verified search along it (`search.py`).
   For a layer-error target: each layer's cheapest candidate within the bound, verified once.
4. The plan, with the verified numbers and a report of how many full forwards it took.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from attnsieve.eval.fidelity import dense_reference
from attnsieve.runinfo import run_info
from attnsieve.tune import calibration
from attnsieve.tune.calibration import CalibPrompt
from attnsieve.tune.plan import LayerChoice, Plan, Target, fingerprint
from attnsieve.tune.profile import Candidate, Profile, profile
from attnsieve.tune.search import (
    OBJECTIVES,
    cost,
    floor_weights,
    lagrangian_path,
    layer_error_choice,
    probe_candidate,
    search,
    sensitivity,
)
from attnsieve.tune.verify import Verification, verify

# progress(description, steps done, steps expected): the total grows when the search needs more
Progress = Callable[[str, int, int], None]


@dataclass
class TuneSpec:
    target: Target
    candidates: list[Candidate]
    objective: str = "time"  # what is minimised: measured attention time, or measured density
    max_verify: int = 6  # verifications (each a full forward per prompt) the search may spend
    # timed repetitions per profiled call (median; the first also gives the outputs). None: 3 when the
    # objective is time (single timings of short calls on a busy machine rank candidates by noise), else 1
    reps: int | None = None
    model: str = ""  # the name the plan records
    seed: int = 0
    extra: dict = field(default_factory=dict)  # recorded in the plan's `tuning` report (the command line)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.max_verify < 1:
            raise ValueError(f"--max-verify must be >= 1, got {self.max_verify}")
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


def tune(model, prompts: list[CalibPrompt], spec: TuneSpec, progress: Progress | None = None) -> tuple[Plan, dict]:
    """Tune a plan for `model` on the calibration `prompts`; returns (plan, report)."""
    if not prompts:
        raise ValueError("tuning needs at least one calibration prompt")
    t0 = time.perf_counter()
    n = len(prompts)
    n_cand = len({c.label for c in spec.candidates} | {"dense"})
    steps = _Steps(progress, n)  # grows once the number of global layers is known
    refs = []
    phase = {"dense_reference": 0.0, "profile": 0.0, "probe": 0.0, "verify": 0.0}  # wall-clock seconds
    for p in prompts:
        steps(f"dense reference: {p.name}")
        refs.append(dense_reference(model, p.prompt_ids, p.answer_ids))
    phase["dense_reference"] = time.perf_counter() - t0
    n_layers = len(refs[0].layers)
    probes = 0 if spec.target.kind == "layer_error" else n_layers
    steps.total = n + n * n_layers * n_cand + (probes + spec.max_verify) * n
    t1 = time.perf_counter()
    prof = profile(refs, spec.candidates, reps=spec.reps, progress=steps)
    phase["profile"] = time.perf_counter() - t1
    forwards = {"dense_reference": n, "probe": 0, "verify": 0}

    def run(choice: dict[int, str], what: str) -> Verification:
        for _ in range(n):
            steps(what)
        kind = "probe" if what.startswith("probe") else "verify"
        forwards[kind] += n
        t = time.perf_counter()
        result = verify(model, refs, {layer: prof.candidate(lab).make() for layer, lab in choice.items()})
        phase[kind] += time.perf_counter() - t
        return result

    report: dict = {"objective": spec.objective, "candidates": [c.label for c in prof.candidates]}
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
            "path": [{"choice": pt.choice, "cost": pt.cost, "predicted_kl": pt.predicted, "moved": pt.moved}
                     for pt in path],
            "verified": [{"index": i, **v.to_json(), "met": met(v)} for i, v in sorted(tried.items())],
            "chosen": index,
        }
        if result is None and not _exact(choice):  # the search ran out of verifications above a plan it never ran
            result = run(choice, "verify the plan")
    if result is None:  # every layer exact: nothing to measure
        dense_s = sum(r.prefill_s or 0.0 for r in refs)
        result = Verification(0.0, 1.0, 1.0, dense_s, dense_s)
    if not spec.target.met(kl=result.kl, top1=result.top1, layer_error=max(
            prof.get(layer, lab).err for layer, lab in choice.items())):
        raise RuntimeError("internal error: the tuner chose a plan that does not meet its target")
    report["full_forwards"] = {**forwards, "total": sum(forwards.values())}
    report["choice"] = {str(layer): lab for layer, lab in choice.items()}
    report["profile"] = prof.to_json()
    report["layer_rel_err"] = {str(layer): prof.get(layer, lab).err for layer, lab in choice.items()}
    report["prefill_ratio"] = result.prefill_ratio
    report["seconds"] = time.perf_counter() - t0
    report["phase_seconds"] = phase
    report.update(spec.extra)
    info = run_info(spec.seed, next(model.parameters()).dtype)
    plan = Plan(
        model=spec.model or str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        fingerprint=fingerprint(model), target=spec.target,
        layers={layer: LayerChoice(prof.candidate(lab).method, dict(prof.candidate(lab).params))
                for layer, lab in choice.items()},
        calibration=calibration.describe(prompts), kl=result.kl, top1=result.top1,
        measured_density=result.density, time_ratio=_time_ratio(prof, choice), seed=spec.seed,
        versions=info["versions"], threads=info["threads"],
        extra={"objective": spec.objective, "dtype": info["dtype"], "device": info["device"], "tuning": report},
    )
    return plan, report


def _exact(choice: dict[int, str]) -> bool:
    return all(lab == "dense" for lab in choice.values())


def _time_ratio(prof: Profile, choice: dict[int, str]) -> float:
    """Measured attention time of the plan's layers over the exact path's on the same layers and prompts."""
    dense = sum(prof.get(layer, "dense").time_s for layer in choice)
    return sum(prof.get(layer, lab).time_s for layer, lab in choice.items()) / dense if dense else 1.0


def _sensitivities(prof: Profile, objective: str, run) -> tuple[dict[int, float], dict]:
    """w_l per layer from one probe each (full forwards with that layer alone replaced)."""
    weights, log = {}, {}
    for layer in prof.layers:
        lab = probe_candidate(prof, layer, objective)
        if lab is None:  # nothing cheaper than exact on this layer: no choice to weigh
            weights[layer] = 0.0
            continue
        v = run({layer: lab}, f"probe layer {layer}: {lab}")
        err2 = prof.get(layer, lab).err2
        weights[layer] = sensitivity(v.kl, err2)
        log[str(layer)] = {"candidate": lab, "kl": v.kl, "top1": v.top1, "err2": err2, "weight": weights[layer]}
    return floor_weights(weights), log


__all__ = ["Candidate", "TuneSpec", "cost", "tune"]

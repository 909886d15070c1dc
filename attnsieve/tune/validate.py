"""Validation of a tuned plan on held-out prompts (`tune --validate`): is it better than one setting for all?

On prompts the tuner never saw (eval's own seeds and depths, on the other haystack; see
`calibration.heldout_prompts`), measured as eval measures them:

- dense (the exact path), the plan, and every profiled candidate applied *uniformly* (one method and
  density in every replaced layer): KL(dense || config) and top-1 over the answer spans (prompt
  prefilled, answer fed as a continuation), measured density, and the attention time ratio measured
  in the profile (the tuner's `--objective time` cost);
- task accuracy (greedy generation, RULER scoring) of dense, the plan and the best uniform
  configuration of equal or better KL: the cheapest uniform one (by the objective) whose held-out KL
  is at most the plan's, dense when none is;
- the frontier: the plans the same run gives for other targets (points of the tuner's path spread
  from the cheapest plan to exact attention, each labelled by its predicted KL as rescaled by the
  verifications), each measured the same way.

Every configuration is a set of full forwards on the held-out prompts; the report counts them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attnsieve.tune import calibration
from attnsieve.tune.calibration import CalibPrompt
from attnsieve.tune.profile import Profile, Unit
from attnsieve.tune.verify import Verification


@dataclass
class ValidationSpec:
    tok: Any  # the model's tokenizer (greedy answers are decoded and scored)
    prompts: list[CalibPrompt]  # held-out prompts (calibration.heldout_prompts)
    # the frontier's other plans: path points at these fractions of the way from the cheapest plan's cost
    # to exact attention's (see tuner._frontier)
    fractions: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75)

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("validation needs at least one held-out prompt")
        if not all(p.max_new_tokens > 0 for p in self.prompts):
            raise ValueError("held-out prompts must be task prompts (with answers to score)")


@dataclass
class Frontier:
    """One plan on the frontier line: the target it stands for and its choice over units."""

    label: str  # "kl<=0.0125", or "path point 7" for a target with no KL model
    target: float | None
    choice: dict[Unit, str]
    chosen: bool = False  # the plan the tuner wrote


def validate(pool, spec: ValidationSpec, prof: Profile, choice: dict[Unit, str], frontier: list[Frontier],
             objective: str, progress: Callable[[str], None] | None = None) -> dict:
    """The validation report of the plan `choice` (see the module doc); JSON-ready. `pool` runs the
    model (pool.LocalPool, or distributed.RayPool)."""
    t0 = time.perf_counter()
    prompts = spec.prompts
    n = len(prompts)
    infos = pool.references("heldout", prompts, progress, what="validate: dense reference")
    dense_s = sum(i.prefill_s for i in infos)
    forwards = n

    def fidelity(ch: dict[Unit, str], what: str) -> dict:
        nonlocal forwards
        if progress:
            for _ in prompts:
                progress(f"validate: {what}")
        forwards += n
        v = Verification.from_rows(pool.verify("heldout", prof.layer_choices(ch)), dense_s)
        return {"kl": v.kl, "top1": v.top1, "measured_density": v.density, "time_ratio": prof.time_ratio(ch),
                "prefill_ratio": v.prefill_ratio}

    def accuracy(ch: dict[Unit, str] | None, what: str) -> float:
        nonlocal forwards
        if progress:
            for _ in prompts:
                progress(f"validate: {what} answers")
        forwards += n
        scores = pool.answers("heldout", None if ch is None else prof.layer_choices(ch))
        return sum(scores) / len(scores)

    def key(row: dict) -> float:
        return row["measured_density"] if objective == "density" else row["time_ratio"]

    dense = {"config": "dense", "kl": 0.0, "top1": 1.0, "measured_density": 1.0, "time_ratio": 1.0,
             "accuracy": accuracy(None, "dense")}
    plan = {"config": "plan", **fidelity(choice, "the plan"), "accuracy": accuracy(choice, "the plan")}
    uniform = []
    for cand in prof.candidates:
        if cand.label == "dense":
            continue
        ch = dict.fromkeys(prof.units, cand.label)
        uniform.append({"config": cand.label, "method": cand.method, "params": dict(cand.params),
                        **fidelity(ch, f"uniform {cand.label}")})
    ok = [u for u in uniform if u["kl"] <= plan["kl"] + 1e-12]
    if ok:
        best = dict(min(ok, key=key))
        best["accuracy"] = accuracy(dict.fromkeys(prof.units, best["config"]), f"uniform {best['config']}")
    else:  # no uniform setting is as faithful as the plan: only exact attention is
        best = dict(dense)
    line = []
    for f in frontier:
        row = plan if f.chosen else fidelity(f.choice, f"frontier {f.label}")
        line.append({"label": f.label, "target": f.target, "chosen": f.chosen, "accuracy": row.get("accuracy"),
                     **{k: row[k] for k in ("kl", "top1", "measured_density", "time_ratio")}})
    line.sort(key=key)
    ratio = key(plan) / key(best) if key(best) else None
    return {
        "prompts": calibration.describe(prompts), "objective": objective,
        "dense": dense, "plan": plan, "best_uniform": best, "uniform": uniform, "frontier": line,
        "cost_vs_best_uniform": ratio,  # plan / best uniform, in the objective's measure
        "accuracy_vs_dense": plan["accuracy"] - dense["accuracy"],
        "full_forwards": forwards, "seconds": time.perf_counter() - t0,
    }


def steps_needed(spec: ValidationSpec, prof: Profile, frontier: list[Frontier]) -> int:
    """Progress steps validate() reports: one per prompt and run (dense reference, dense answers, the
    plan's fidelity and answers, each uniform configuration, the best uniform's answers, the frontier)."""
    runs = 5 + (len(prof.candidates) - 1) + sum(not f.chosen for f in frontier)
    return len(spec.prompts) * runs

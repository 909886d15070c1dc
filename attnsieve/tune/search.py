"""The allocation: which candidate each unit gets, cheapest first, until the verified target holds.

A unit is a replaced layer, or one query head of one (`--granularity head`); the text below says
"layer" for both.

Model of the end-to-end error. A small change of one layer's attention output moves the next-token
distribution by a KL that is, to second order, quadratic in the change; changes in different layers
add. So the tuner predicts KL(plan) = sum over layers of w_l * e_l(c_l)^2, where e_l(c) is candidate
c's relative output error on layer l (profiled on the dense run's own inputs) and w_l the layer's
sensitivity, measured once per layer by a full forward with that layer alone replaced (a probe).
The heads of one layer share its sensitivity; a head's error is relative to the whole layer's
output, so its squared error is its share of the layer's.

Allocation. Per layer, the candidates that are not dominated (no other is both cheaper and more
accurate) and lie on the lower convex hull of (cost, w_l * e_l^2) are the only ones a Lagrangian
relaxation min sum cost + lambda * distortion ever picks. Starting from every layer's cheapest hull
point, the greedy step moves the one layer whose next hull point buys the most distortion per unit
of cost; the sequence of plans (the path) runs from the cheapest plan to the exact one and contains
the Lagrangian optimum for every lambda (multiple-choice knapsack over convex hulls).

Search. Plans along the path are verified with full forwards (`verify`); the path's end needs none
(zero distortion: exact). The first plan tried is the cheapest whose predicted KL meets the target;
after each verification the model is rescaled by measured / predicted KL and the bracket
[last failing, cheapest passing] narrows, falling back to bisection when the model keeps proposing
the bracket's edge. The result is always a verified plan (or the exact one) and the cheapest
passing plan on the path when the target is monotone along it. `--target-top1` has no model and
bisects; `--target-layer-error` needs no search (each layer's cheapest candidate within the bound;
per head, the cheapest point of the layer's own path whose combined error is within it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attnsieve.tune.plan import Target
from attnsieve.tune.profile import Measurement, Profile, Unit

OBJECTIVES = ("time", "density")


def cost(m: Measurement, objective: str) -> float:
    """What the tuner minimises: computed cells (density) or measured seconds (time), over all prompts."""
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    return float(m.cells) if objective == "density" else m.time_s


def hull(row: dict[str, Measurement], objective: str) -> list[str]:
    """Candidate labels on the lower convex hull of (cost, mean squared error), cheapest first.

    The last one has the least error (the exact path, or a candidate that is as exact and cheaper)."""
    pts = sorted(((cost(m, objective), m.err2, lab) for lab, m in row.items()), key=lambda p: (p[0], p[1]))
    pareto: list[tuple[float, float, str]] = []
    for p in pts:
        if not pareto or p[1] < pareto[-1][1]:
            pareto.append(p)
    out: list[tuple[float, float, str]] = []
    for p in pareto:  # Andrew's monotone chain, lower part: pop while the middle point is not below
        while len(out) >= 2:
            (x1, y1, _), (x2, y2, _) = out[-2], out[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:
                out.pop()
            else:
                break
        out.append(p)
    return [lab for _, _, lab in out]


def layer_hull(profile: Profile, unit: Unit, objective: str) -> list[str]:
    """The hull of one unit's candidates (see `hull`)."""
    return hull(profile.table[unit], objective)


@dataclass
class PathPoint:
    choice: dict[Unit, str]  # unit -> candidate label
    cost: float  # summed over units (and prompts)
    predicted: float  # predicted KL: sum of w_u * e_u^2
    moved: Unit | None = None  # the unit this step moved to a denser candidate (None at the start)


def predicted_kl(profile: Profile, weights: dict[Unit, float], choice: dict[Unit, str]) -> float:
    return sum(weights[unit] * profile.get(unit, lab).err2 for unit, lab in choice.items())


def lagrangian_path(profile: Profile, objective: str, weights: dict[Unit, float],
                    units: list[Unit] | None = None) -> list[PathPoint]:
    """Plans from the cheapest to the most accurate, one unit moving one hull point per step
    (over `units`, default all of the profile's)."""
    units = profile.units if units is None else units
    hulls = {u: layer_hull(profile, u, objective) for u in units}
    pos = dict.fromkeys(units, 0)

    def point(moved):
        choice = {u: hulls[u][pos[u]] for u in units}
        total = sum(cost(profile.get(u, lab), objective) for u, lab in choice.items())
        return PathPoint(choice, total, predicted_kl(profile, weights, choice), moved)

    path = [point(None)]
    while True:
        best, best_ratio = None, -1.0
        for u in units:
            h, i = hulls[u], pos[u]
            if i + 1 >= len(h):
                continue
            a, b = profile.get(u, h[i]), profile.get(u, h[i + 1])
            gain = weights[u] * (a.err2 - b.err2)
            extra = max(cost(b, objective) - cost(a, objective), 1e-30)
            if gain / extra > best_ratio:
                best, best_ratio = u, gain / extra
        if best is None:
            return path
        pos[best] += 1
        path.append(point(best))


def layer_error_choice(profile: Profile, objective: str, bound: float) -> dict[Unit, str]:
    """Per layer, the cheapest choice whose mean relative error is within `bound` (dense always is).

    Layer units: the cheapest candidate within it. Head units: along the layer's own greedy path over
    its heads (cheapest to exact), the first point whose combined layer error is within it."""
    choice: dict[Unit, str] = {}
    for layer in profile.layers:
        units = profile.units_of(layer)
        if profile.heads is None:
            row = profile.table[layer]
            ok = [(cost(m, objective), m.err, lab) for lab, m in row.items() if m.err <= bound]
            ok.append((cost(profile.get(layer, "dense"), objective), 0.0, "dense"))
            choice[layer] = min(ok)[2]
            continue
        path = lagrangian_path(profile, objective, dict.fromkeys(units, 1.0), units)
        within = [pt for pt in path if profile.layer_err(layer, pt.choice) <= bound]
        choice.update(within[0].choice if within else dict.fromkeys(units, "dense"))
    return choice


def probe_candidate(profile: Profile, layer: int, objective: str) -> str | None:
    """The candidate whose full forward measures a layer's sensitivity (on all its heads): the middle
    of its inexact hull points (the regime the target usually falls in); None when the hull is the
    exact path alone."""
    points = hull(profile.layer_row(layer), objective)[:-1]
    return points[len(points) // 2] if points else None


def sensitivity(kl: float, err2: float) -> float:
    """w_l from one probe: measured KL per unit of squared relative error."""
    return kl / err2 if err2 > 0 else 0.0


def floor_weights(weights: dict[Unit, float], rel: float = 1e-3) -> dict[Unit, float]:
    """No layer counts as exactly insensitive (a probe's KL can round to 0): floor at rel * the largest."""
    top = max(weights.values(), default=0.0)
    floor = rel * top if top > 0 else 1.0
    return {layer: max(w, floor) for layer, w in weights.items()}


def search(path: list[PathPoint], target: Target, verify: Callable[[int], Any], met: Callable[[Any], bool],
           measured_kl: Callable[[Any], float], max_verify: int) -> tuple[int, dict[int, Any]]:
    """Index of the cheapest verified plan on `path` meeting the target, and every verification made.

    `verify(i)` runs full forwards of path[i]; `met(result)` says whether it meets the target;
    `measured_kl(result)` is its KL (rescales the model). At most `max_verify` verifications; the
    path's last point (exact) is the fallback and is never verified here.
    """
    if max_verify < 1:
        raise ValueError(f"max_verify must be >= 1, got {max_verify}")
    lo, hi = -1, len(path) - 1
    results: dict[int, Any] = {}
    scale, last_edge = 1.0, False
    while hi - lo > 1 and len(results) < max_verify:
        mid = (lo + hi) // 2
        if target.kind == "kl":
            passing = [j for j in range(lo + 1, hi) if path[j].predicted * scale <= target.value]
            guess = passing[0] if passing else hi - 1
        else:
            guess = mid
        edge = guess in (lo + 1, hi - 1) and hi - lo > 3
        if edge and last_edge:  # the model keeps pointing at the bracket's edge: halve the bracket instead
            guess, edge = mid, False
        last_edge = edge
        result = verify(guess)
        results[guess] = result
        if met(result):
            hi = guess
        else:
            lo = guess
        got = measured_kl(result)
        if target.kind == "kl" and path[guess].predicted > 0 and got > 0:
            scale = got / path[guess].predicted
    return hi, results

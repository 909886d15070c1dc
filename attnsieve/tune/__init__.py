"""attnsieve tune: per-layer and per-head plans that meet an accuracy target at the lowest attention cost.

- `plan.py`: the plan file (versioned JSON) and its validation; a leaf the integration reads.
- `calibration.py`: calibration prompts (task generators on seeds `eval` never uses, or text files).
- `profile.py`: every candidate (method, parameters, density) on every replaced layer or query head,
  replayed on the dense run's captured q/k/v: output error, exact mass covered, measured density, measured time.
- `search.py`: the allocation (per-layer convex hulls, the greedy / Lagrangian path from the cheapest
  plan to dense) and the verified search along it; pure, no model.
- `verify.py`: full forwards of candidate plans on the calibration prompts (KL and top-1 as eval
  defines them) and the per-layer sensitivity probes.
- `validate.py`: `--validate`, the plan against dense and uniform configurations on held-out prompts;
  `report.py` writes its JSON, markdown and frontier plot next to the plan.
- `pool.py` / `distributed.py`: where the model work runs: this process, or Ray workers (`--ray`).
- `tuner.py`: the whole run, `tune(model, prompts, spec) -> (Plan, report)`.

Only `plan` is imported here, so reading a plan never imports the tuner (or transformers).
"""

from attnsieve.tune.plan import SCHEMA, LayerChoice, Plan, Target, as_plan, fingerprint, load_plan

__all__ = ["SCHEMA", "LayerChoice", "Plan", "Target", "as_plan", "fingerprint", "load_plan"]

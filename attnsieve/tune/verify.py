"""Full forwards of a candidate plan on the calibration prompts, measured as eval measures fidelity.

Each prompt is prefilled with the plan patched in (a look-ahead estimator sees the prompt's
queries, never the answer's), then the answer is fed as a continuation over that cache
(`eval.fidelity.continuation_logprobs`); KL(dense || plan) and top-1 agreement are taken against
the dense reference's log-probabilities and averaged over prompts (each prompt's own mean over its
span first, as one eval row). One such prompt run is one "full forward" in the tuner's count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnsieve.eval.fidelity import DenseReference, continuation_logprobs, kl_and_top1, timer
from attnsieve.integrations.hf import patched
from attnsieve.methods import Method


@dataclass
class Verification:
    kl: float  # mean over prompts
    top1: float
    density: float | None  # measured, cell-weighted over the replaced layers and all prompts
    prefill_s: float  # prompt prefills, summed
    dense_prefill_s: float  # the exact path's prompt prefills of the references, summed
    per_prompt: list[dict] = field(default_factory=list)

    @property
    def prefill_ratio(self) -> float:
        return self.prefill_s / self.dense_prefill_s if self.dense_prefill_s else float("nan")

    def to_json(self) -> dict:
        return {"kl": self.kl, "top1": self.top1, "measured_density": self.density,
                "prefill_ratio": self.prefill_ratio, "per_prompt": self.per_prompt}


@torch.no_grad()
def verify(model, refs: list[DenseReference], layers: dict[int, Method]) -> Verification:
    """KL, top-1 and measured density of `layers` ({layer: method}, every other layer exact) on `refs`."""
    rows, kls, tops, prefill = [], [], [], 0.0
    with patched(model, "dense", layers=layers) as p:
        for ref in refs:
            t = timer()
            logprobs = continuation_logprobs(model, ref.prompt_ids, ref.answer_ids, capture=t)
            kl, top1 = kl_and_top1(ref.logprobs, logprobs)
            kls.append(kl)
            tops.append(top1)
            prefill += t.seconds
            rows.append({"kl": kl, "top1": top1, "prefill_s": t.seconds})
    dense_s = sum(r.prefill_s or 0.0 for r in refs)
    return Verification(sum(kls) / len(kls), sum(tops) / len(tops), p.stats.density(), prefill, dense_s, rows)

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

    @classmethod
    def from_rows(cls, rows: list[dict], dense_prefill_s: float) -> Verification:
        """The verification over prompts from their rows (in prompt order), wherever each was run."""
        exact = sum(r["exact_cells"] for r in rows)
        return cls(sum(r["kl"] for r in rows) / len(rows), sum(r["top1"] for r in rows) / len(rows),
                   sum(r["cells"] for r in rows) / exact if exact else None, sum(r["prefill_s"] for r in rows),
                   dense_prefill_s, rows)


@torch.no_grad()
def verify_rows(model, refs: list[DenseReference], layers: dict[int, Method]) -> list[dict]:
    """Per prompt: KL, top-1, the replaced layers' computed and exact cells, prefill seconds of `layers`."""
    rows = []
    with patched(model, "dense", layers=layers) as p:
        for ref in refs:
            t = timer()
            start = len(p.stats.records)
            logprobs = continuation_logprobs(model, ref.prompt_ids, ref.answer_ids, capture=t)
            kl, top1 = kl_and_top1(ref.logprobs, logprobs)
            mine = [r for r in p.stats.records[start:] if r.role == "method" and r.phase == "prefill"]
            rows.append({"kl": kl, "top1": top1, "prefill_s": t.seconds, "cells": sum(r.cells for r in mine),
                         "exact_cells": sum(r.exact_cells for r in mine)})
    return rows


def verify(model, refs: list[DenseReference], layers: dict[int, Method]) -> Verification:
    """KL, top-1 and measured density of `layers` ({layer: method}, every other layer exact) on `refs`."""
    return Verification.from_rows(verify_rows(model, refs, layers), sum(r.prefill_s or 0.0 for r in refs))

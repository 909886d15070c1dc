"""`attnsieve demo`: pass-key retrieval on the embedded model with dense, window and block-topk.

For every length and depth it times stock transformers SDPA prefill and each method's prefill
(and each tuned plan's, given `plans`) in the same process on the same input, scores the
greedy answer, and reads each method's measured density. Rows aggregate over depths: accuracy
is the mean score, prefill_ratio the median of per-sample ratios (method prefill / stock SDPA
prefill on the same sample).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from attnsieve.eval.generation import greedy
from attnsieve.eval.tasks import make_passkey, score_contains
from attnsieve.integrations.hf import patched
from attnsieve.methods import has_param


@dataclass
class DemoConfig:
    lengths: list[int] = field(default_factory=lambda: [2048, 4096])
    depths: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    methods: list[str] = field(default_factory=lambda: ["dense", "window", "block-topk"])
    density: float = 0.1
    seed: int = 0
    plans: list[Any] = field(default_factory=list)  # tuned plans (attnsieve.tune.Plan), one row each per length

    def __post_init__(self):
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        for n in self.lengths:
            if n < 64:
                raise ValueError(f"length must be >= 64 tokens, got {n}")
        for d in self.depths:
            if not 0 <= d <= 1:
                raise ValueError(f"depth must be in [0, 1], got {d}")


def method_params(name: str, density: float) -> dict:
    return {"density": density} if has_param(name, "density") else {}


def check_lengths(model, lengths: list[int]) -> None:
    limit = model.config.get_text_config().max_position_embeddings
    for n in lengths:
        if not 64 <= n <= limit:
            raise ValueError(f"length {n} is outside this model's range [64, {limit}]")


def _configs(cfg: DemoConfig) -> list[tuple[str, dict, Any]]:
    """(row name, patch() keywords, plan or None) per configuration: the methods, then the plans."""
    out = [(name, {"method": name, **method_params(name, cfg.density)}, None) for name in cfg.methods]
    labels = set()
    for plan in cfg.plans:
        if plan.label() in labels:
            raise ValueError(f"two plans have the same label {plan.label()!r} (same target, same model); "
                             "run them apart")
        labels.add(plan.label())
        out.append((plan.label(), {"plan": plan}, plan))
    return out


def run_demo(model, tok, cfg: DemoConfig, progress=None) -> list[dict]:
    """Run the demo grid; `progress(description)` is called before each step (for a progress bar)."""
    check_lengths(model, cfg.lengths)
    for plan in cfg.plans:
        plan.check_model(model)
    configs = _configs(cfg)
    # Warm-up: the first forward pass pays one-off allocation costs that would skew the first ratio.
    warm = make_passkey(tok, 256, 0.5, cfg.seed).input_ids
    greedy(model, tok, warm, 0)
    for _, spec, _ in configs:
        with patched(model, **spec):
            greedy(model, tok, warm, 0)

    samples: dict[tuple[str, int], list[dict]] = {}
    for length in cfg.lengths:
        for depth in cfg.depths:
            sample = make_passkey(tok, length, depth, cfg.seed)
            if progress:
                progress(f"{length} tokens, depth {depth:.2f}: stock SDPA")
            stock_s = greedy(model, tok, sample.input_ids, 0).prefill_s
            for name, spec, _ in configs:
                if progress:
                    progress(f"{length} tokens, depth {depth:.2f}: {name}")
                with patched(model, **spec) as p:
                    gen = greedy(model, tok, sample.input_ids, sample.max_new_tokens)
                    density = p.stats.density()
                    estimate_s = p.stats.estimate_s()
                correct = score_contains(gen.text, sample.answers)
                samples.setdefault((name, length), []).append(
                    dict(correct=correct, density=density, ratio=gen.prefill_s / stock_s,
                         prefill_s=gen.prefill_s, stock_s=stock_s, estimate_s=estimate_s, output=gen.text)
                )
    plans = {name: plan for name, _, plan in configs}
    rows = []
    for (name, length), xs in samples.items():
        plan = plans[name]
        rows.append(
            {
                "method": name if plan is None else "plan",
                "config": name,
                "params": method_params(name, cfg.density) if plan is None else {},
                "plan": None if plan is None else plan.record(),
                "length": length,
                "samples": len(xs),
                "accuracy": sum(x["correct"] for x in xs) / len(xs),
                "density": sum(x["density"] for x in xs) / len(xs),
                "prefill_ratio": statistics.median(x["ratio"] for x in xs),
                "prefill_s": statistics.median(x["prefill_s"] for x in xs),
                "stock_prefill_s": statistics.median(x["stock_s"] for x in xs),
                "estimate_s": statistics.median(x["estimate_s"] for x in xs),
            }
        )
    return rows

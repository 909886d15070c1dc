"""ACT's head search: which heads gain from calibrating their hidden attention sinks (cached per model).

Step 1 of ACT (Yu et al., ICML 2024; GATECH-EIC/ACT `scripts/calibration.sh`): calibrate one head at a
time on a calibration set and keep the heads whose calibration improves the model there. The
reference scores classification accuracy on 900 samples of its datasets, over layers 2 .. L-2 (the
first two and the last layer are never calibrated) and query heads 0-3; here every query head of the
candidate layers is tried and the score is the mean log-probability of the answers of `samples`
attnsieve task prompts (teacher-forced, as `eval`'s fidelity metrics compute it; a finer signal than
the accuracy of a few samples), on seeds `eval` never uses. Candidate layers are the layers where
`patch(model, "act")` runs the method: the global layers (Gemma-3's sliding layers run exact local
attention unless named in `layers=`). A head is kept when its gain exceeds `min_gain` nats.
"""

from __future__ import annotations

import sys

import torch

from attnsieve.cache._heads import calibration_path, model_key, save_calibration


def _answer_logprob(model, prompts) -> float:
    from attnsieve.eval.fidelity import continuation_logprobs

    total, n = 0.0, 0
    for cp in prompts:
        lp = continuation_logprobs(model, cp.prompt_ids, cp.answer_ids)
        total += float(lp[torch.arange(len(cp.answer_ids)), torch.tensor(cp.answer_ids)].sum())
        n += len(cp.answer_ids)
    return total / n


@torch.no_grad()
def calibrate_act(model, tok, *, length: int = 1024, samples: int = 8, tasks=("passkey", "niah_single"),
                  haystack: str = "prose", beta: float = 0.4, threshold: float = 0.1, min_gain: float = 0.0,
                  name: str | None = None, cache_dir=None, refresh: bool = False,
                  progress: bool = True) -> dict:
    """Search the heads ACT calibrates; returns {"heads": {layer: [query heads]}, "gains": ..., ...}.

    Cached as JSON under the attnsieve cache directory keyed by model and length (found again by
    `make("act", heads=<model name>)`); `refresh` recomputes."""
    import json

    from attnsieve.integrations.hf import patched
    from attnsieve.methods import make
    from attnsieve.tune.calibration import task_prompts

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    make("act", beta=beta, threshold=threshold)  # the parameters' own checks, before anything runs
    key = model_key(name or str(getattr(model, "name_or_path", "") or type(model).__name__), cache_dir)
    path = calibration_path("act", key, length, cache_dir)
    settings = {"length": length, "samples": samples, "tasks": list(tasks), "haystack": haystack, "beta": beta,
                "threshold": threshold, "min_gain": min_gain}
    if path.exists() and not refresh:
        doc = json.loads(path.read_text())
        if doc.get("settings") == settings:
            return doc
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers, H = cfg.num_hidden_layers, cfg.num_attention_heads
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers
    candidates = [i for i in range(2, n_layers - 1) if types[i] != "sliding_attention"]
    if not candidates:
        raise ValueError(f"the model has no global layer between layer 2 and layer {n_layers - 2} to calibrate")
    prompts = task_prompts(tok, list(tasks), [length], samples, haystack=haystack)
    with patched(model, "dense"):
        base = _answer_logprob(model, prompts)
    gains: dict[int, list[float]] = {}
    for li in candidates:
        gains[li] = []
        for h in range(H):
            if progress:
                print(f"attnsieve: ACT head search, layer {li} head {h} ({len(prompts)} prompts)", file=sys.stderr)
            method = make("act", beta=beta, threshold=threshold, heads={li: [h]})
            with patched(model, "dense", layers={li: method}):
                gains[li].append(_answer_logprob(model, prompts) - base)
    heads = {li: [h for h, g in enumerate(row) if g > min_gain] for li, row in gains.items()}
    doc = {"kind": "act", "model": key, "settings": settings, "baseline_logprob": base, "gains": gains,
           "heads": {li: hs for li, hs in heads.items() if hs}, "prompts": [cp.name for cp in prompts]}
    save_calibration(path, doc)
    return json.loads(json.dumps(doc))  # the same key types as a cached read

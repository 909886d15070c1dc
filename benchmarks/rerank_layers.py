"""Which layers should ICR read on a model with sliding-window layers? Measured, not assumed.

One dense ICR pass per input reads every layer (`layers="all"`); the same pass is then scored as if only
all layers, the global layers or the sliding layers had been summed (`RerankDetails.rescore`), with the
reference's calibration and without it (the query's raw attention mass). Inputs: five one-sentence
documents in five orders (the case of issue #15), and the `rerank` task's samples as `eval` builds them.
Prints a table, then one JSON line (also written to --out).

    python benchmarks/rerank_layers.py --length 2048 --samples 10 --out docs/results/rerank-2k/layers.json
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

import attnsieve
from attnsieve.eval.tasks.rerank import make_rerank
from attnsieve.precision import resolve_dtype
from attnsieve.runinfo import run_info
from attnsieve.signals.rerank import ndcg_at_k, rerank

FIVE = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The Great Wall of China stretches thousands of kilometres across northern China.",
    "Mount Everest is the highest mountain above sea level, in the Himalayas.",
    "The Pacific Ocean is the largest and deepest of Earth's oceans.",
]
FIVE_QUERY, FIVE_RELEVANT = "How do plants turn sunlight into energy?", 1


def readings(details, retrieval: dict[str, list] | None = None) -> dict[str, list[float]]:
    """Scores per reading: {all, global, sliding} x {calibrated, raw}, input order; plus, with `retrieval`
    ({name: (layer, head) pairs}), those heads alone, calibrated."""
    n_layers, n_heads = details.token_scores.shape[:2]
    groups = {"all": range(n_layers), "global": [i for i in range(n_layers) if not details.sliding[i]],
              "sliding": [i for i in range(n_layers) if details.sliding[i]]}
    out = {}
    for name, layers in groups.items():
        pairs = [(li, h) for li in layers for h in range(n_heads)]
        out[f"{name}, calibrated"] = details.rescore(pairs)
        raw = details.token_scores[list(layers)].sum((0, 1))
        out[f"{name}, raw"] = [float(raw[lo:hi].sum()) for lo, hi in details.spans]
    for name, pairs in (retrieval or {}).items():
        out[name] = details.rescore(pairs)
    return out


def order(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--retrieval", action="store_true",
                    help="also score the retrieval heads rerank(heads='retrieval') would pick (profiles them once)")
    args = ap.parse_args()
    dt = resolve_dtype(args.dtype)
    model, tok = attnsieve.load(args.model, dtype=dt)
    t0 = time.perf_counter()
    retrieval = None
    if args.retrieval:
        from attnsieve.signals.heads import head_profiles, retrieval_query_heads
        from attnsieve.signals.rerank import PROFILE_LENGTHS, PROFILE_SAMPLES

        prof = head_profiles(model, tok, lengths=list(PROFILE_LENGTHS), samples=PROFILE_SAMPLES, progress=False)
        glob = {"layers": [row for row in prof["layers"] if not row["sliding"]]}
        retrieval = {"retrieval heads of global layers (heads='retrieval')": sorted(retrieval_query_heads(glob, 0.1)),
                     "retrieval heads of all layers": sorted(retrieval_query_heads(prof, 0.1))}

    five: dict[str, list[int]] = {}
    rng = random.Random(args.seed)
    perms = [list(range(5)), list(range(4, -1, -1))] + [rng.sample(range(5), 5) for _ in range(3)]
    for perm in perms:
        r = rerank(model, tok, FIVE_QUERY, [FIVE[i] for i in perm], layers="all")
        for name, s in readings(r.details, retrieval).items():
            five.setdefault(name, []).append(perm[order(s)[0]])

    task: dict[str, dict[str, list[float]]] = {}
    for i in range(args.samples):
        sample = make_rerank(tok, args.length, (i + 0.5) / args.samples, args.seed + i)
        m = sample.meta
        r = rerank(model, tok, m["query"], m["passages"], layers="all")
        for name, s in readings(r.details, retrieval).items():
            o = order(s)
            cell = task.setdefault(name, {"top1": [], "ndcg10": []})
            cell["top1"].append(float(o[0] == m["relevant"]))
            cell["ndcg10"].append(ndcg_at_k(o, [m["relevant"]]))

    rows = []
    print(f"{'reading':<52} {'five docs: right first':>24} {'task top-1':>11} {'task nDCG@10':>13}")
    for name in task:
        right = sum(w == FIVE_RELEVANT for w in five[name])
        top1 = sum(task[name]["top1"]) / args.samples
        ndcg = sum(task[name]["ndcg10"]) / args.samples
        rows.append({"reading": name, "five_right_first": right, "five_orders": len(perms), "five_first": five[name],
                     "task_top1": top1, "task_ndcg10": ndcg, "task_per_sample": task[name]})
        print(f"{name:<52} {f'{right}/{len(perms)}':>24} {top1:>11.2f} {ndcg:>13.3f}")
    doc = {"command": "benchmarks/rerank_layers.py", "model": args.model, "length": args.length,
           "samples": args.samples, "orders": perms, "retrieval_heads": retrieval, "rows": rows,
           "seconds": time.perf_counter() - t0, **run_info(args.seed, dt)}
    line = json.dumps(doc)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()

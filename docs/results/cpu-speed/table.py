"""Median table of `attnsieve bench kernel` rounds (kernel.jsonl) for the README.

python docs/results/cpu-speed/table.py  (from the repository root)
"""

import json
import statistics
from collections import defaultdict
from pathlib import Path

here = Path(__file__).parent
runs = defaultdict(list)
for line in (here / "kernel.jsonl").read_text().splitlines():
    r = json.loads(line)
    runs[(r["heads"], r["kv_heads"], r["head_dim"], r["length"], r["params"].get("density"))].append(r)

names = {(4, 1, 256): "4 heads / 1 KV, dim 256 (Gemma-3)", (9, 3, 64): "9 heads / 3 KV, dim 64 (SmolLM2)"}
print("| head shape | length | density | runs | SDPA s | estimate s | sparse s | speed-up (median, min-max) "
      "| kernel speed-up | estimate / sparse | measured density |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for (h, hkv, d, length, dens), rs in sorted(runs.items(), key=lambda kv: (-kv[0][2], kv[0][4] == 1.0, kv[0][3])):
    med = {key: statistics.median(r[key] for r in rs) for key in
           ("dense_s", "estimate_s", "sparse_s", "speedup", "kernel_speedup", "estimate_share", "measured_density")}
    lo, hi = min(r["speedup"] for r in rs), max(r["speedup"] for r in rs)
    print(f"| {names[(h, hkv, d)]} | {length} | {dens} | {len(rs)} | {med['dense_s']:.2f} | {med['estimate_s']:.3f} "
          f"| {med['sparse_s']:.3f} | {med['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) | {med['kernel_speedup']:.2f}x "
          f"| {med['estimate_share']:.0%} | {med['measured_density']:.3f} |")
